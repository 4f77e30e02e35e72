"""Summary of scripts/hf_model_tests.sh: per architecture, transformers' model tests passed /
failed / skipped without and with moe_infer.optimize, and every test that passes without it but
not with it. Reads <dir>/<arch>.<plain|optimized>.xml (JUnit), prints Markdown."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(path: Path) -> dict:
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return result


def main(directory: str) -> None:
    root = Path(directory)
    archs = sorted({p.name.split(".")[0] for p in root.glob("*.xml")})
    print("| architecture | without moe_infer (pass / fail / skip) | with optimize() (pass / fail / skip) |")
    print("|---|---|---|")
    regressions = {}
    for arch in archs:
        runs = {}
        for mode in ("plain", "optimized"):
            path = root / f"{arch}.{mode}.xml"
            runs[mode] = outcomes(path) if path.exists() else {}
        cells = []
        for mode in ("plain", "optimized"):
            counts = [sum(v == k for v in runs[mode].values()) for k in ("passed", "failed", "skipped")]
            cells.append(" / ".join(map(str, counts)) if runs[mode] else "not run")
        print(f"| {arch} | {cells[0]} | {cells[1]} |")
        regressions[arch] = sorted(
            name for name, v in runs["plain"].items() if v == "passed" and runs["optimized"].get(name) != "passed"
        )
    print()
    for arch, names in regressions.items():
        print(f"{arch}: {len(names)} test(s) pass without moe_infer but not with it")
        for name in names:
            print(f"  - {name}")


if __name__ == "__main__":
    main(sys.argv[1])
