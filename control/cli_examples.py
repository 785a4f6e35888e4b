"""An example at the end of every command's ``--help`` (argparse epilog), kept in one
table so that the commands' own modules stay about what they do.

``add_examples`` is applied to the finished parser. A command missing from the
table just has no example, and tests/test_completion.py fails until it has one.
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[tuple[str, ...], str] = {
    (): "consulate agent --log-level debug\n"
        "  consulate status",
    ("agent",): "consulate agent --advertise 10.0.0.5 --dns-addr 127.0.0.1:8600,172.17.0.1:53\n"
                "  consulate agent --registry etcd://10.0.0.1:2379,10.0.0.2:2379 --relay native",
    ("register",): "consulate register web 10.0.0.5:8080 --id web-1 --tag v1 --ttl 30s",
    ("deregister",): "consulate deregister web-1",
    ("services",): "consulate services\n"
                   "  consulate services --json | jq -r '.[].id'",
    ("routes",): "consulate routes\n"
                 "  consulate routes --json | jq -r '.[] | .service + \" \" + .vip'",
    ("status",): "consulate status\n"
                 "  consulate status --json | jq '.services[] | {name, connect_failures}'",
    ("completion",): "source <(consulate completion bash)\n"
                     "  consulate completion bash > /etc/bash_completion.d/consulate",
    ("lab",): "consulate lab up --hosts 2 --containers 3",
    ("lab", "up"): "consulate lab up --hosts 3 --containers 2 --name consulate-try",
    ("lab", "down"): "consulate lab down consulate-try\n  consulate lab down --all",
    ("lab", "exec"): "consulate lab exec consulate-try h1c1 -- dig web.service.consul",
    ("lab", "status"): "consulate lab status consulate-try",
    ("registrator",): "consulate registrator -ip 10.0.0.5 -cleanup consulate://127.0.0.1:8500",
    ("docker-opts",): "dockerd $(consulate docker-opts)\n"
                      "  docker run $(consulate docker-opts) busybox nslookup web.service.consul",
    ("iptables",): "consulate iptables --print --vip-cidr 240.0.0.0/4 --proxy-port 10000",
    ("demo",): "consulate demo",
    ("configurator",): "consulate configurator consulate://127.0.0.1:8500/config/web "
                       "nginx-conf /etc/nginx/conf.d/web.conf -r 'nginx -s reload'",
    ("job",): "consulate job run web.toml && consulate job status web",
    ("job", "run"): "consulate job run web.toml\n  consulate job run - < web.json",
    ("job", "status"): "consulate job status web",
    ("job", "stop"): "consulate job stop web",
    ("alloc",): "consulate alloc explain 3f2a9c1e",
    ("alloc", "status"): "consulate alloc status 3f2a9c1e",
    ("alloc", "explain"): "consulate alloc explain 3f2a9c1e",
}


class ExampleFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps a text with line breaks (an example)
    as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Set the epilog of ``parser`` and of every subparser under it (an epilog
    its own module gives is kept)."""
    example = EXAMPLES.get(path)
    if example is not None and not parser.epilog:
        parser.epilog = f"example:\n  {example}\n"
        parser.formatter_class = ExampleFormatter
    for action in parser._actions:  # argparse offers no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                add_examples(subparser, (*path, name))
