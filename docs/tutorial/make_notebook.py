#!/usr/bin/env python3
"""Writes electricity.ipynb from electricity.py (cells marked `# %%`, markdown cells
`# %% [markdown]`), so the notebook and the script the tests run are the same steps.
Run it after editing the script; tests/tests/tutorial.rs fails when the two differ."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cells(source: str):
    blocks, current = [], None
    for line in source.splitlines():
        if line.startswith("# %%"):
            if current:
                blocks.append(current)
            current = ("markdown" if "[markdown]" in line else "code", [])
            continue
        if current is None:
            continue
        kind, lines = current
        lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else ("" if kind == "markdown" and line == "#" else line))
    if current:
        blocks.append(current)
    out = []
    for kind, lines in blocks:
        while lines and not lines[-1].strip():
            lines.pop()
        text = [l + "\n" for l in lines]
        if text:
            text[-1] = text[-1].rstrip("\n")
        cell = {"cell_type": kind, "metadata": {}, "source": text}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        out.append(cell)
    return out


def notebook() -> str:
    with open(os.path.join(HERE, "electricity.py")) as f:
        source = f.read()
    nb = {
        "cells": cells(source),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"cell-{i}"
    return json.dumps(nb, indent=1) + "\n"


if __name__ == "__main__":
    path = os.path.join(HERE, "electricity.ipynb")
    text = notebook()
    if "--check" in sys.argv:
        with open(path) as f:
            sys.exit(0 if f.read() == text else "electricity.ipynb is stale: run docs/tutorial/make_notebook.py")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
