"""Runs the project's Python host scripts on request, in one interpreter that stays up: each
script's `python3 - ARGS` without a new interpreter per call (connectors/agent.py).

Standard library only; started as `python3 -I -S -c SOURCE` (inside a network namespace when
its caller needs one), so its standard input is free for requests. One JSON request per line:

    {"name": "drill_host.py", "source": "...", "argv": ["start", ...]}

`source` comes with a script's first request and is kept for the later ones. The script runs as
its own `__main__` with `sys.argv` set, its stdout and stderr captured; SystemExit gives the
exit status. With `"argv": null` the script is only loaded: its module level runs (its imports,
paid before a call that is timed) under another name, so it does nothing. One JSON answer per
line: {"exit": N, "stdout": "...", "stderr": "..."}. The agent ends when its input does.
"""

import contextlib
import io
import json
import os
import sys
import traceback


def run(code, argv):
    out, err = io.StringIO(), io.StringIO()
    status = 0
    sys.argv = ["-", *(argv or [])]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(code, {"__name__": "__main__" if argv is not None else "__loaded__", "__builtins__": __builtins__})
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                status = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                status = 1
        except BaseException:  # noqa: BLE001 - reported as the script's failure, the agent goes on
            traceback.print_exc()
            status = 1
    return {"exit": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def serve(requests, answers):
    scripts = {}
    while True:
        line = requests.readline()
        if not line:
            return
        try:
            request = json.loads(line)
            name = request["name"]
            if "source" in request:
                scripts[name] = compile(request["source"], name, "exec")
            argv = request["argv"]
            answer = run(scripts[name], None if argv is None else [str(arg) for arg in argv]) if name in scripts else \
                {"exit": 2, "stdout": "", "stderr": f"script agent: no source for {name!r}"}
        except (ValueError, KeyError, TypeError, SyntaxError) as exc:
            answer = {"exit": 2, "stdout": "", "stderr": f"script agent: bad request: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # Answers go out on a descriptor of their own; anything else writing to descriptor 1 (a
    # child process, a stray write) lands on stderr instead of inside the answers.
    # Requests likewise: a script or its children reading stdin read nothing, not the requests.
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(os.devnull, encoding="utf-8")
    serve(requests, answers)
