"""/v1/config path edits and JSON Patch (RFC 6902), pure."""

from __future__ import annotations

from typing import Any

import pytest

from consulate.control.configurator import jsonpatch, paths

DOC: dict[str, Any] = {"a": {"b": [1, 2]}, "s": "x"}


def test_get_put_post_delete() -> None:
    assert paths.get(DOC, "a/b/1") == 2
    assert paths.get(DOC, "") == DOC
    assert paths.put(DOC, "a/c/d", 5) == {"a": {"b": [1, 2], "c": {"d": 5}}, "s": "x"}
    assert paths.put(DOC, "a/b/2", 3) == {"a": {"b": [1, 2, 3]}, "s": "x"}
    assert paths.put(DOC, ["a", "b", "0"], 9) == {"a": {"b": [9, 2]}, "s": "x"}
    assert paths.post(DOC, "a/b", {"k": 1}) == {"a": {"b": [1, 2, {"k": 1}]}, "s": "x"}
    assert paths.post(DOC, "a", {"z": 1}) == {"a": {"b": [1, 2], "z": 1}, "s": "x"}
    assert paths.delete(DOC, "a/b/0") == {"a": {"b": [2]}, "s": "x"}
    assert paths.delete(DOC, ["s"]) == {"a": {"b": [1, 2]}}
    assert DOC == {"a": {"b": [1, 2]}, "s": "x"}  # never edited in place


def test_keys_with_slashes_by_segments() -> None:
    doc = paths.put({}, ["http", "location /"], {"return": 204})
    assert doc == {"http": {"location /": {"return": 204}}}
    assert paths.get(doc, ["http", "location /", "return"]) == 204


@pytest.mark.parametrize(("edit", "error", "message"), [
    (lambda: paths.get(DOC, "a/x"), paths.PathNotFound, "no key 'x' at '/a/x'"),
    (lambda: paths.get(DOC, "a/b/2"), paths.PathNotFound,
     "'/a/b/2': '2' is not an index of this array of 2 (use 0 to 1)"),
    (lambda: paths.get(DOC, "s/t"), paths.PathNotFound,
     "'/s/t': 't' is below a string, which has no children"),
    (lambda: paths.post(DOC, "s", 1), paths.NotAContainer,
     "POST '/s': the value there is a string; POST merges into objects and appends to "
     "arrays: use PUT to replace it"),
    (lambda: paths.post(DOC, "a", [1]), paths.PathError,
     "POST '/a': merging into an object needs an object, not a array; use PUT to replace it"),
    (lambda: paths.post(DOC, "nope", {}), paths.PathNotFound, "no key 'nope' at '/nope'"),
    (lambda: paths.delete(DOC, ""), paths.PathError,
     "DELETE of the whole document: PUT {} to empty it instead"),
    (lambda: paths.put(DOC, "s/t/u", 1), paths.PathNotFound,
     "'/s/t/u': '/s' is a string, which has no children"),
])
def test_errors_name_the_path(edit: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        edit()
    assert str(caught.value) == message


def test_rfc6902_appendix_a_examples() -> None:
    apply = jsonpatch.apply_patch
    assert apply({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}]) == {
        "foo": "bar", "baz": "qux"}
    assert apply({"foo": ["bar", "baz"]},
                 [{"op": "add", "path": "/foo/1", "value": "qux"}]) == {
        "foo": ["bar", "qux", "baz"]}
    assert apply({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}]) == {
        "foo": "bar"}
    assert apply({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}]) == {
        "foo": ["bar", "baz"]}
    assert apply({"baz": "qux", "foo": "bar"},
                 [{"op": "replace", "path": "/baz", "value": "boo"}]) == {
        "baz": "boo", "foo": "bar"}
    assert apply({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
                 [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]) == {
        "foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}
    assert apply({"foo": ["all", "grass", "cows", "eat"]},
                 [{"op": "move", "from": "/foo/1", "path": "/foo/3"}]) == {
        "foo": ["all", "cows", "eat", "grass"]}
    assert apply({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]
                 ) == {"foo": ["bar", ["abc", "def"]]}
    assert apply({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}]) == {
        "/": 9, "~1": 10}
    assert apply({"a": 1}, [{"op": "copy", "from": "/a", "path": "/b"}]) == {"a": 1, "b": 1}


def test_patch_is_atomic_and_errors_name_the_operation() -> None:
    doc = {"a": 1}
    with pytest.raises(jsonpatch.PatchError) as caught:
        jsonpatch.apply_patch(doc, [{"op": "add", "path": "/b", "value": 2},
                                    {"op": "remove", "path": "/missing"}])
    assert str(caught.value) == "operation 1 (remove '/missing'): no member 'missing' to remove"
    assert doc == {"a": 1}


@pytest.mark.parametrize(("patch", "message"), [
    ({"op": "add"}, "a JSON Patch is an array of operations"),
    ([{"op": "frob", "path": "/a"}], 'operation 0: needs "op" as one of add, remove, replace, '
     "move, copy, test"),
    ([{"op": "add", "path": "/a"}], "operation 0 (add): missing 'value'"),
    ([{"op": "add", "path": "a", "value": 1}], "operation 0 (add 'a'): pointer 'a' must be "
     "empty or start with '/'"),
    ([{"op": "add", "path": "/l/01", "value": 1}], "operation 0 (add '/l/01'): '01' is not "
     "an array index"),
    ([{"op": "add", "path": "/l/5", "value": 1}], "operation 0 (add '/l/5'): index 5 is out "
     "of range for an array of 1"),
    ([{"op": "move", "from": "/l", "path": "/l/0"}], "operation 0 (move '/l/0'): cannot move "
     "'/l' into its own child '/l/0'"),
    ([{"op": "replace", "path": "/nope", "value": 1}], "operation 0 (replace '/nope'): no "
     "member 'nope'"),
])
def test_malformed_patches(patch: Any, message: str) -> None:
    with pytest.raises(jsonpatch.PatchError) as caught:
        jsonpatch.apply_patch({"l": [0]}, patch)
    assert str(caught.value).startswith(message)


def test_test_op_compares_as_json() -> None:
    with pytest.raises(jsonpatch.PatchTestFailed):
        jsonpatch.apply_patch({"a": 1}, [{"op": "test", "path": "/a", "value": True}])
    assert jsonpatch.apply_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0}]) == {
        "a": 1}
    assert jsonpatch.json_equal({"x": [1, {"y": None}]}, {"x": [1, {"y": None}]})
    assert not jsonpatch.json_equal([1], [1, 2])


# -- found by make fuzz -----------------------------------------------------------------


@pytest.mark.parametrize("part", ["²", "𐹠", "٣"])
def test_an_index_is_ascii_digits_only(part: str) -> None:
    """str.isdigit() holds for superscripts and other scripts' digits, and int()
    refuses some of them (a 500 before): an index is ASCII digits, as JSON Pointer's."""
    with pytest.raises(paths.PathNotFound) as caught:
        paths.get({"a": [1]}, ["a", part])
    assert str(caught.value) == (f"'/a/{part}': {part!r} is not an index of this array of 1 "
                                 "(use 0 to 0)")
    with pytest.raises(jsonpatch.PatchError) as patch_caught:
        jsonpatch.apply_patch({"a": [1]}, [{"op": "remove", "path": f"/a/{part}"}])
    assert str(patch_caught.value) == (f"operation 0 (remove '/a/{part}'): {part!r} is not "
                                       "an array index")
