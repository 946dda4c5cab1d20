"""Property-based fuzzing of a live env server from its own OpenAPI schema (schemathesis).

The served schema links a created session to its step, state and delete routes, so the stateful
test plays random sequences of creates, steps, state reads and deletes on LIVE sessions, with
schema-valid and schema-violating (negative) bodies alike. Every answer must be a 2xx or a 4xx
(never a 5xx: the fuzzer only makes client mistakes, and Echo and Math have no known bugs) that
matches the schema: documented status, content type and body shape. Two envs, one per way a step
runs: Echo steps on the event loop, Math on an env thread and grades in the verifier pool.

Runs are reproducible: Hypothesis is derandomized, and every scenario starts on an empty server
(a replayed scenario must meet the server it met first).
"""

import logging
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

FUZZ_SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=False,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much])

# The schema says env_kwargs is any object (each env takes its own); fuzzed as such, every create
# would be refused and no session would go live. So the fuzzer gets each env's real constructor
# kwargs, typed and in ranges that straddle the valid ones (0 rounds, a 1-character action space,
# a negative verifier timeout), and no kwarg that reads files (tasks_path) or starts sandboxes.
ENV_KWARGS = {
    "cwm_rl/Echo-v0": {
        "num_rounds": {"type": "integer", "minimum": -1, "maximum": 6},
        "max_turns": {"type": ["integer", "null"], "minimum": -1, "maximum": 6},
        "max_action_chars": {"type": "integer", "minimum": 0, "maximum": 64},
    },
    "cwm_rl/Math-v0": {
        "difficulty": {"type": "integer", "minimum": -1, "maximum": 7},
        "operators": {"type": ["string", "null"], "maxLength": 4},
        "think": {"type": "boolean"},
        "correct_reward": {"type": "number"},
        "wrong_reward": {"type": "number"},
        "verify_timeout_s": {"type": "number", "minimum": -1, "maximum": 10},
        "max_turns": {"type": ["integer", "null"], "minimum": -1, "maximum": 3},
    },
}
CHECKS = {
    "enabled": True,  # all of schemathesis's checks: 5xx, status codes, content types, body schemas, use after delete, ...
    # ...but two that assume what this API does not promise: that a schema-valid body is accepted
    # (which env kwargs and tasks an env takes is beyond a schema: the env's refusal is a 422), and
    # that a created session stays (it is closed when its env rejects its task or kwargs mid-step).
    "positive_data_acceptance": {"enabled": False},
    "ensure_resource_availability": {"enabled": False},
}


def load_schema(server, env_id: str | None = None) -> schemathesis.BaseSchema:
    """The server's own schema; with `env_id`, creates name that env and its kwargs."""
    raw = httpx.get(server.url + "/openapi.json").json()
    if env_id is not None:
        create = raw["components"]["schemas"]["CreateSessionRequest"]["properties"]
        create["env_id"] = {"type": "string", "enum": [env_id]}
        create["env_kwargs"] = {"type": "object", "properties": ENV_KWARGS[env_id], "additionalProperties": False}
    config = schemathesis.Config.from_dict({"base-url": server.url, "seed": 0, "checks": CHECKS, "request-timeout": 60})
    return schemathesis.openapi.from_dict(raw, config=config)


@pytest.fixture
def server_errors():
    """Records logged at ERROR by the server (its env failures and uvicorn's tracebacks): there must be none."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("envs.server", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.parametrize("env_id", ["cwm_rl/Echo-v0", "cwm_rl/Math-v0"])
def test_live_sessions_survive_stateful_fuzzing(server, server_errors, env_id):
    schema = load_schema(server, env_id)
    answers: Counter[tuple[str, str, int]] = Counter()
    created: list[str] = []

    class Fuzz(schema.as_state_machine()):
        def after_call(self, response, case):
            super().after_call(response, case)
            answers[case.method, case.operation.path, response.status_code] += 1
            if case.operation.path == "/v1/sessions" and response.status_code == 200:
                created.append(response.json()["session_id"])

        def teardown(self):
            for session_id in created:  # 404 if the scenario deleted it: fine
                httpx.delete(f"{server.url}/v1/sessions/{session_id}")
            created.clear()
            server.app.state.sessions.creations.clear()  # create request ids start afresh too

    Fuzz.run(settings=hypothesis.settings(max_examples=120, stateful_step_count=8, **FUZZ_SETTINGS))

    print(f"{env_id}: {sum(answers.values())} requests;", dict(sorted(answers.items())))
    assert [r.getMessage() for r in server_errors] == []
    step = "/v1/sessions/{session_id}/step"
    # Live sessions were fuzzed, and the client-mistake answers were met along the way.
    for answer in [("POST", step, 200), ("POST", step, 422), ("GET", "/v1/sessions/{session_id}", 200),
                   ("DELETE", "/v1/sessions/{session_id}", 200), ("POST", "/v1/sessions", 422)]:
        assert answers[answer] > 0, f"the fuzzer never got {answer}: {dict(answers)}"
    assert answers["POST", step, 409] + answers["POST", step, 404] > 0  # steps after an episode or session ended
    assert not any(status >= 500 for _, _, status in answers)


def test_every_route_takes_any_request_without_a_server_error(server, server_errors):
    """Each route of the schema as served (env ids and kwargs free), valid and invalid requests."""
    schema = load_schema(server)
    statuses: Counter[tuple[str, str, int]] = Counter()

    @hypothesis.given(case=st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)))
    @hypothesis.settings(max_examples=300, **FUZZ_SETTINGS)
    def fuzz(case):
        response = case.call_and_validate()
        statuses[case.method, case.operation.path, response.status_code] += 1

    fuzz()
    print(f"{sum(statuses.values())} requests;", dict(sorted(statuses.items())))
    assert [r.getMessage() for r in server_errors] == []
    assert {path for _, path, _ in statuses} == set(httpx.get(server.url + "/openapi.json").json()["paths"])
