import json, subprocess
from fakellm import FakeLLM
from conftest import drop, order_md, sh
from coordinator.store import Store
from coordinator.supervisor import Supervisor

KEY = "sk-probe-SECRET-123456"

def test_probe(make_ws, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY)
    with FakeLLM() as fake:
        ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"],
                               "llm": {"base_url": fake.base_url, "model": "m", "api_key_env": "FAKE_KEY",
                                       "max_retries": 0, "prices": {"input": 3, "output": 15}}}})
        fake.script(content=json.dumps({"outcome": "done", "summary": "wrote it",
            "edits": [{"path": "webapp/src/greeting.py", "content": "def greet():\n    return 1\n"}]}))
        acc = ("`grep -q greet src/greeting.py` passes", "b is true", "c is true")
        drop(ws, "chip", "g.md", order_md("The app greets", files=("webapp/src/greeting.py",), acceptance=acc, id="g"))
        lines = []
        with Supervisor(ws, log=lines.append) as sup:
            sup.run_once(limit=20)
        rec = Store(ws.state).load("g")
        print(rec.status, rec.report, rec.usage, lines)
        assert rec.status == "done"
