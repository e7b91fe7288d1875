"""walt, the demo orchestrator: routes a request into work orders; never does the work."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coordinator.demo.common import order, result


def main() -> None:
    o = order()
    outbox = Path(os.environ["COORD_OUTBOX"])
    base = o["id"][:64 - len("-review")]  # an id is at most 64 characters, the request's too
    code_id, review_id = f"{base}-code", f"{base}-review"
    code = {
        "id": code_id, "objective": o["objective"], "priority": o["priority"],
        "acceptance": [a["text"] if not a.get("check") else {"text": a["text"], "check": a["check"]}
                       for a in o["acceptance"]],
        "files": o["files"],
        "branching": [{"action": "halt-with-note", "when": "the change is already there"},
                      {"action": "route-to", "agent": "rex", "when": "the change needs a design review"}],
        "references": [o["id"]],
    }
    review = {
        "id": review_id, "objective": f"Review the change made for {o['id']}: {o['objective']}"[:280],
        "priority": o["priority"],
        "acceptance": ["Every file of " + ", ".join(o["files"]) + " was read" if o["files"] else "The request was read",
                       "The summary names what looks wrong, if anything",
                       "No file outside the review notes is changed"],
        "files": [f"{o['files'][0].split('/', 1)[0]}/docs/reviews/{o['id']}.md"] if o["files"] else [],
        "branching": [{"action": "halt-with-note", "when": "there is nothing to review"}],
        "blocked_by": [code_id], "references": [o["id"]],
    }
    for to, body in (("chip", code), ("rex", review)):
        (outbox / to).mkdir(parents=True, exist_ok=True)
        (outbox / to / f"{body['id']}.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
    print(f"walt: {o['id']}: routed to chip ({code_id}) and rex ({review_id})")
    result("done", f"Routed: {code_id} to chip, then {review_id} to rex once it is done.")


if __name__ == "__main__":
    main()
