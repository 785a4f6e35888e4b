"""Configurator: software with configuration files as an appliance with a REST API.

A JSON document in a store (a file, Consul or consulate KV, etcd) goes through
macros (store values, files, environment, the live instances of registry
services) and a transformer (nginx, HAProxy, TOML, jinja2) into a target file,
which is validated by the real binary, replaced atomically and reloaded, with a
roll-back when the reload fails. See ``engine.py`` for the pipeline.
"""
