"""chip, the demo coder: adds a line for the objective to each file of its order."""

from __future__ import annotations

from coordinator.demo.common import local, may, order, result


def main() -> None:
    o = order()
    objective = o["objective"]
    halt = may(o, "halt-with-note")
    if halt and "already" in objective.lower():
        result("halt-with-note", f"Nothing to do: {halt['when']}.")
        return
    touched = []
    for f in o["files"]:
        if any(c in f for c in "*?["):
            continue  # a glob names a scope, not a file to create
        path = local(f)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text("utf-8") if path.exists() else ""
        if path.suffix == ".py":
            name = path.stem.replace("-", "_")
            text += f'\n\ndef {name}_{o["id"].replace("-", "_").replace(".", "_").lower()}() -> str:\n'
            text += f'    """{objective}"""\n    return {objective!r}\n'
        else:
            text += f"\n- {o['id']}: {objective}\n"
        path.write_text(text.lstrip("\n"), encoding="utf-8")
        touched.append(f)
    print(f"chip: {o['id']}: edited {len(touched)} file(s): {', '.join(touched) or 'none'}")
    result("done", f"Edited {', '.join(touched) or 'no files'} for: {objective}")


if __name__ == "__main__":
    main()
