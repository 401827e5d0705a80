"""Names the baseline workers and the driver share (importable without settings)."""

DONE_KEY = "bench:done"

BASELINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_checkpoints (
    chain_id   text NOT NULL,
    step       integer NOT NULL,
    state      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, step)
);
CREATE TABLE IF NOT EXISTS bench_step_log (
    id         bigserial PRIMARY KEY,
    chain_id   text NOT NULL,
    step       integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench_submissions (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    body            jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
"""
