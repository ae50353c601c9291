"""Markdown table of a benchmark run, for the README.

    pytest bench --benchmark-enable --benchmark-json out.json
    python -m bench.report out.json

One row per (benchmark, peer): layerfs median, the peer, its median measured
in the same rounds, the ratio layerfs/peer of the medians (and of the fastest
rounds, less sensitive to a busy machine) and the goal; then the machine line
(CPU model, cores, kernel, target filesystem) and notes (tool versions, which
layer a peer could read).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import List, Optional


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    return f"{s:.1f} s"


def fmt_ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}x"


def fmt_goal(goal: Optional[float], ratio: Optional[float]) -> str:
    if goal is None:
        return ""
    text = f"≤ {goal:.2f}x"
    if ratio is None:
        return text
    return text + (" ✓" if ratio <= goal else " ✗")


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(data: dict) -> str:
    m = (data.get("machine_info") or {}).get("layerfs_bench") or {}
    cpu = m.get("cpu_model") or _cpu_model()
    cores = m.get("cores") or os.cpu_count()
    kernel = m.get("kernel") or platform.release()
    fs = m.get("target_fs")
    if not fs:
        fss = {b.get("extra_info", {}).get("fs") for b in data.get("benchmarks", [])} - {None}
        fs = ", ".join(sorted(fss)) or "unknown"
    parts = [f"CPU: {cpu}", f"{cores} cores", f"kernel {kernel}", f"target filesystem: {fs}"]
    if m.get("memory_gb"):
        parts.insert(2, f"{m['memory_gb']} GiB RAM")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    when = data.get("datetime")
    if when:
        parts.append(f"run {when[:16].replace('T', ' ')} UTC")
    return "; ".join(parts)


def _bench_label(b: dict) -> str:
    info = b.get("extra_info", {})
    name = b.get("group") or b.get("name", "?")
    corpus = info.get("corpus")
    label = f"{name}: {corpus}" if corpus else name
    test = b.get("name", "")
    if not corpus and b.get("group") and "[" in test:
        label += " " + test[test.index("["):]
    layer = info.get("layer")
    if isinstance(layer, str):
        layer = Path(layer).name
    if layer:
        label += f" ({layer}, {_mb(info.get('layer_bytes'))})" if info.get("layer_bytes") \
            else f" ({layer})"
    return label


def _flat_peers(info: dict) -> List[dict]:
    """Peers stored as flat keys ``<peer>_median_s`` beside ``ours_median_s``.

    The ratio is recomputed here as layerfs / peer, whatever the file stored."""
    ours = info.get("ours_median_s")
    out = []
    for k, v in info.items():
        if k.endswith("_median_s") and k != "ours_median_s" and isinstance(v, (int, float)):
            out.append({"name": k[:-len("_median_s")], "median": v,
                        "ratio": (ours / v) if ours and v else None})
    return out


def rows(data: dict) -> List[List[str]]:
    out = []
    benches = sorted(data.get("benchmarks", []),
                     key=lambda b: (b.get("group") or "", b.get("extra_info", {}).get("corpus") or "",
                                    b.get("name", "")))
    for b in benches:
        info = b.get("extra_info", {})
        stats = b.get("stats", {})
        timed_layerfs = info.get("timed", "layerfs") == "layerfs"
        me = stats.get("median") if timed_layerfs else None
        peers = info.get("peers") or _flat_peers(info)
        if not peers:
            out.append([_bench_label(b), fmt_time(me), "—", "—", "—", "—", ""])
            continue
        for p in peers:
            pm = p.get("median")
            if pm is None and p.get("times"):
                pm = statistics.median(p["times"])
            ratio = p.get("ratio")
            if ratio is None and me and pm:
                ratio = me / pm
            rmin = p.get("ratio_min")
            if rmin is None and timed_layerfs and p.get("times") and stats.get("min"):
                rmin = stats["min"] / min(p["times"])
            out.append([_bench_label(b), fmt_time(me), p.get("name", "?"), fmt_time(pm),
                        fmt_ratio(ratio), fmt_ratio(rmin), fmt_goal(p.get("goal"), ratio)])
    return out


def notes(data: dict) -> List[str]:
    seen, out = set(), []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        for key in ("umoci", "skopeo"):
            if info.get(key) and (key, info[key]) not in seen:
                seen.add((key, info[key]))
                out.append(f"{key}: {info[key]}")
        if info.get("timed") == "peer" and ("peers-only",) not in seen:
            seen.add(("peers-only",))
            out.append("peers only: layerfs was not run (--bench-peers-only); "
                       "the first peer was the timed target")
    cmds = {}                 # (name, command) in order of appearance
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("timed") == "layerfs" and info.get("contender"):
            cmds.setdefault((info["contender"], info.get("command", "")), None)
        for p in info.get("peers") or []:
            cmds.setdefault((p.get("name"), p.get("command", "")), None)
    for name, cmd in cmds:
        if cmd:
            out.append(f"{name}: `{cmd}`")
    starts = [b["extra_info"]["cli_startup_s"] for b in data.get("benchmarks", [])
              if isinstance(b.get("extra_info", {}).get("cli_startup_s"), (int, float))]
    if starts:
        span = fmt_time(min(starts)) if min(starts) == max(starts) else \
            f"{fmt_time(min(starts))} to {fmt_time(max(starts))}"
        out.append("CLI start-up (the command on empty input: `unpack` of an empty layer, "
                   f"`diff` of two empty directories; part of every CLI time): {span}")
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if isinstance(info.get("cpu_bound_s"), (int, float)) and info.get("cpu_s"):
            goals = [f"{p['name']} x {p['goal']:.2f} = {fmt_time(p['median'] * p['goal'])}"
                     for p in info.get("peers") or [] if p.get("goal") and p.get("median")]
            out.append(f"{_bench_label(b)}: layerfs CPU (user+sys) {fmt_time(info['cpu_s'])} "
                       f"per run, so on this machine's cores no run can take less than "
                       f"{fmt_time(info['cpu_bound_s'])} (start-up on one core, the rest on all)"
                       + (f"; goal {', '.join(goals)}" if goals else ""))
    loads = [x for b in data.get("benchmarks", [])
             for x in (b.get("extra_info", {}).get("loadavg") or [])]
    if loads:
        out.append(f"1-minute load average around the benchmarks: {min(loads):.1f} to "
                   f"{max(loads):.1f}")
    rounds = {b.get("stats", {}).get("rounds") for b in data.get("benchmarks", [])} - {None}
    if rounds:
        out.append("medians of " + "/".join(str(r) for r in sorted(rounds))
                   + " rounds, layerfs and peers interleaved, each into a fresh directory"
                   " after a sync(2)")
    return out


def markdown(data: dict) -> str:
    header = ["benchmark", "layerfs median", "peer", "peer median", "ratio", "ratio of mins",
              "goal (ratio)"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---:", "---", "---:", "---:", "---:", "---"]) + "|"]
    for r in rows(data):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines.append("")
    lines.append(machine_line(data))
    n = notes(data)
    if n:
        lines.append("")
        lines.extend(f"- {x}" for x in n)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report",
                                 description="Markdown table of a pytest-benchmark JSON file")
    ap.add_argument("json", type=Path, help="file written by --benchmark-json")
    ap.add_argument("-k", "--only", metavar="TEXT", action="append", default=[],
                    help="keep the benchmarks whose full name contains TEXT (repeatable)")
    args = ap.parse_args(argv)
    text = args.json.read_text()
    if not text.strip():
        print(f"{args.json}: empty (no benchmark ran)", file=sys.stderr)
        return 1
    data = json.loads(text)
    if args.only:
        data["benchmarks"] = [b for b in data.get("benchmarks", [])
                              if any(t in b.get("fullname", b.get("name", "")) for t in args.only)]
    sys.stdout.write(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
