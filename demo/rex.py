"""rex, the demo reviewer: reads the order's files and reports what it found."""

from __future__ import annotations

from coordinator.demo.common import local, may, order, result


def main() -> None:
    o = order()
    notes = []
    for f in o["files"]:
        path = local(f)
        if path.is_file():
            lines = path.read_text("utf-8", "replace").count("\n")
            notes.append(f"{f}: {lines} lines, read")
        elif "/docs/reviews/" in f and not any(c in f for c in "*?["):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# Review for {o['id']}\n\n{o['objective']}\n\nLooks right to rex.\n", "utf-8")
            notes.append(f"{f}: review written")
    route = may(o, "route-to")
    if route and "route" in o["objective"].lower():
        result("route-to", f"This is {route['agent']}'s work: {route['when']}.", agent=route["agent"])
        return
    print(f"rex: {o['id']}: " + ("; ".join(notes) or "nothing to read"))
    result("done", "Reviewed: " + ("; ".join(notes) or "no files named"))


if __name__ == "__main__":
    main()
