"""`cwm-rl view RUN_DIR`: a read-only live web viewer of a run's rollouts, curves and analysis results.

    cwm-rl view runs/demo            # then open http://127.0.0.1:8686 (docs/viewer.md)

- `app.py`: the FastAPI app (`make_app(run_dir)`): JSON under /api, the page from `static/`
- `queries.py`: the SQL, read-only connections, keyset paging, the bounded text search
- `runs.py`: which runs there are, metrics.jsonl and summary.json; `tokens.py`: token ids to text
- `groups.py`, `analysis.py`: the group page; replay, rescore and branch results (analysis.sqlite)
- `server.py`: a uvicorn server in a thread (tests, screenshots); `demo.py`: a demo run to look at
- `static/`: index.html, style.css and ES modules (no build step); `colors.js` documents the token colours

Nothing here writes to a run directory: the stores are opened with SQLite's `mode=ro`.
"""
