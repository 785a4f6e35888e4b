"""How long does re-rendering 1,000 templates over 100 services take? (issue 9)

The configurator's render path, timed in CPU seconds: 1,000 templates (each its
own document, an nginx site listening on its own port) whose upstream blocks
list the live instances of 100 services (3 instances each, followed from a real
embedded registry). A repetition registers one more instance (the change that
triggers the re-render), then renders every template: macros (``$services``
from the followed registry) and the transformer.

Variants, on the same data in the same run:

* consulate nginx-conf: the configurator's pipeline with the nginx-conf transformer;
* consulate jinja2: the same pipeline with a jinja2 template as the transformer;
* jinja2 (plain): the peer, plain jinja2 rendering the same template from data
  prepared beforehand (what a template tool does once it holds the data); the
  three produce byte-identical output, checked every repetition.

Writes ``results/configurator.md``, ``.json`` and ``.png``.

    python -m bench.configurator [--templates 1000] [--services 100] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `consulate` importable the same way
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jinja2

from bench.report import Cell, Metric, Section, chart, markdown, results_json
from bench.signals import run_main
from consulate.control.configurator import macros
from consulate.control.configurator.engine import Template, render_all
from consulate.control.configurator.services import ServiceFollower
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transformers import make_transformer
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry.model import Instance

RESULTS = Path(__file__).resolve().parent / "results"
INSTANCES = 3  # per service
NGINX_TEMPLATE = """\
http {
{% for s in services %}    upstream {{ s.name }} {
{% for i in s.instances %}        server {{ i.address }}:{{ i.port }};
{% endfor %}    }
{% endfor %}    server {
        listen {{ port }};
    }
}
"""
VARIANTS = ("consulate nginx-conf", "consulate jinja2", "jinja2 (plain)")
SECTION = Section(
    key="rerender", title="Re-render every template after a registry change",
    metrics=(Metric("cpu_s", "CPU", "s", False, 3), Metric("wall_s", "wall", "s", False, 3)),
    chart="configurator.png", extras=(Metric("bytes", "output", "bytes", False, 0),),
    versus=("jinja2 (plain)",))


def _names(services: int) -> list[str]:
    return [f"svc-{k:03d}" for k in range(services)]


def nginx_document(names: list[str], port: int) -> dict[str, Any]:
    http: dict[str, Any] = {f"upstream {name}": {"server": {
        "$services": name, "format": "{address}:{port}"}} for name in names}
    http["server"] = {"listen": port}
    return {"http": http}


def jinja_document(names: list[str], port: int) -> dict[str, Any]:
    return {"port": port, "services": [{"name": name, "instances": {"$services": name}}
                                       for name in names]}


def _plain(template: jinja2.Template, data: list[dict[str, Any]], ports: list[int]) -> list[
        str]:
    return [template.render(services=data, port=port) for port in ports]


def _timed(work: Callable[[], list[str]]) -> tuple[dict[str, float], list[str]]:
    cpu, wall = time.process_time(), time.perf_counter()
    outputs = work()
    return ({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
             "bytes": float(sum(len(o) for o in outputs))}, outputs)


async def measure(templates: int, services: int, reps: int, work: Path) -> dict[str, Cell]:
    registry = EmbeddedRegistry(work / "registry.db")
    registry.start()
    names = _names(services)
    for name in names:
        for j in range(INSTANCES):
            await registry.register(Instance(f"{name}-{j}", name, f"10.1.{j}.{names.index(name)}",
                                             8000 + j))
    follower = ServiceFollower(registry, "embedded", lambda moved: None)
    follower.start()
    await follower.ready.wait()
    (work / "nginx.j2").write_text(NGINX_TEMPLATE)
    nginx = Template(make_transformer("nginx-conf"), TargetFile(work / "out"), "")
    via_jinja = Template(make_transformer(f"jinja2:{work}/nginx.j2"), TargetFile(work / "out"),
                         "")
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                               autoescape=False).from_string(NGINX_TEMPLATE)
    ports = [10000 + t for t in range(templates)]
    nginx_docs = [nginx_document(names, port) for port in ports]
    jinja_docs = [jinja_document(names, port) for port in ports]

    def pipeline(documents: list[dict[str, Any]], template: Template) -> list[str]:
        outputs = []
        for document in documents:
            sources = macros.Sources(document, {}, lambda path: None, follower.instances)
            outputs.append(render_all(document, [template], sources)[0].text)
        return outputs

    cells = {name: Cell() for name in VARIANTS}
    try:
        for rep in range(reps):
            name = names[rep % services]
            await registry.register(Instance(f"{name}-new{rep}", name, f"10.2.{rep}.1", 9000))
            await asyncio.sleep(0.2)  # the follower has seen it: its cache of that service is gone
            data = [{"name": n, "instances": sorted(follower.instances(n),
                                                    key=macros.instance_order)} for n in names]
            runs = {
                "consulate nginx-conf": lambda: pipeline(nginx_docs, nginx),
                "consulate jinja2": lambda: pipeline(jinja_docs, via_jinja),
                "jinja2 (plain)": functools.partial(_plain, plain, data, ports),
            }
            outputs: dict[str, list[str]] = {}
            for variant in VARIANTS:
                sample, outputs[variant] = _timed(runs[variant])
                cells[variant].samples.append(sample)
            first = outputs[VARIANTS[0]]
            if any(outputs[v] != first for v in VARIANTS[1:]):
                raise RuntimeError("the variants rendered different bytes: fix the benchmark")
            print(f"rep {rep + 1}/{reps}: " + ", ".join(
                f"{v} {cells[v].samples[-1]['cpu_s']:.3f}s" for v in VARIANTS), flush=True)
    finally:
        await follower.close()
        await registry.close()
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cells = asyncio.run(measure(args.templates, args.services, args.reps, Path(work)))
    results = {SECTION.key: cells}
    RESULTS.mkdir(exist_ok=True)
    chart(SECTION, cells, VARIANTS, RESULTS / SECTION.chart)
    consulate_cpu = cells["consulate nginx-conf"].median("cpu_s") or 0.0
    preamble = [
        ("Run", [("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
                 ("machine", f"{platform.machine()}, {os.cpu_count()} cores, Python "
                             f"{platform.python_version()}, jinja2 {jinja2.__version__}"),
                 ("command", "python -m bench.configurator " + " ".join(sys.argv[1:]))]),
        ("Conditions", [
            ("templates", f"{args.templates} nginx sites, one document each"),
            ("services", f"{args.services}, {INSTANCES} instances each (+1 per repetition), "
                         "followed from a real embedded registry"),
            ("measured", "CPU seconds (process_time) to render every template after one "
                         "registry change; the variants' outputs are byte-identical"),
            ("target", f"under 1 s of CPU: consulate nginx-conf median {consulate_cpu:.3f} s "
                       f"({'met' if consulate_cpu < 1.0 else 'NOT met'})")]),
    ]
    text = markdown("Configurator: re-rendering 1,000 templates x 100 services", preamble,
                    [SECTION], results, VARIANTS, args.reps)
    (RESULTS / "configurator.md").write_text(text)
    (RESULTS / "configurator.json").write_text(json.dumps(results_json(results), indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
