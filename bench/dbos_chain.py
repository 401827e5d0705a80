"""The DBOS Transact baseline: one process running ``--workflows`` workflows of
``--steps`` trivial ``@DBOS.step`` steps each (``python -m bench.dbos_chain``).

DBOS checkpoints every step's output in its system database (PostgreSQL), the same
durability unit as an Outlast step. The benchmark starts several of these processes
with distinct executor ids (so none recovers another's workflows at launch), waits
until each has launched and written ``<result>.ready``, then creates ``--go-file``;
each writes ``{"started", "finished", "workflows", "steps"}`` (wall-clock seconds) to
``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from dbos import DBOS, DBOSConfig


@DBOS.step()
def trivial_step(index: int, state: int) -> int:
    return state + 1


@DBOS.workflow()
def chain(steps: int) -> int:
    state = 0
    for index in range(steps):
        state = trivial_step(index, state)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="PostgreSQL URL of DBOS's system database")
    parser.add_argument("--workflows", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--executor", required=True)
    parser.add_argument("--go-file", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    config: DBOSConfig = {
        "name": "outlast-bench",
        "system_database_url": args.url,
        "executor_id": args.executor,
        "log_level": "WARNING",
        "sys_db_pool_size": 20,
    }
    DBOS(config=config)
    DBOS.launch()
    Path(args.result + ".ready").write_text(str(os.getpid()))
    go = Path(args.go_file)
    while not go.exists():
        time.sleep(0.001)
    started = time.time()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    handles = [DBOS.start_workflow(chain, args.steps) for _ in range(args.workflows)]
    results = [handle.get_result() for handle in handles]
    finished = time.time()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    assert all(r == args.steps for r in results), results
    Path(args.result).write_text(
        json.dumps(
            {
                "started": started,
                "finished": finished,
                "workflows": args.workflows,
                "steps": args.steps,
                "cpu_s": cpu_s,
            }
        )
    )
    DBOS.destroy()


if __name__ == "__main__":
    main()
