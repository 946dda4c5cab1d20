import pytest
from pydantic import ValidationError

from cwm_rl.types import Message, Span, Task, Trajectory, Turn


def make_trajectory(**overrides) -> Trajectory:
    fields = dict(
        task_id="t1", env_id="cwm_rl/Echo-v0", group_id="g", sample_index=1,
        token_ids=[5, 6, 7, 8, 9], loss_mask=[0, 1, 1, 0, 1], logprobs=[0.0, -0.5, -0.1, 0.0, -2.0],
        policy_versions=[-1, 3, 3, -1, 4],
        turns=[
            Turn(index=0, action="ab", observation=[Message(role="user", content="more")], reward=1.0,
                 action_span=Span(start=1, end=3), observation_span=Span(start=3, end=4)),
            Turn(index=1, action="c", reward=0.5, action_span=Span(start=4, end=5)),
        ],
        messages=[Message(role="user", content="q")],
        reward_details={"verdict": "correct"},
        terminated=True,
        finish_reason="terminated",
    )
    fields.update(overrides)
    episode_return = fields.pop("return_", 1.5)
    return Trajectory(**fields, **{"return": episode_return})


def test_trajectory_json_round_trip():
    t = make_trajectory()
    data = t.model_dump_json()
    assert '"return":1.5' in data  # stored under its contract name
    again = Trajectory.model_validate_json(data)
    assert again == t
    assert again.num_generated_tokens == 3
    assert (again.oldest_version, again.newest_version) == (3, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_mask": [0, 1, 1, 0]}, "loss_mask has 4 entries but token_ids has 5"),
        ({"logprobs": [0.0, -0.5]}, "logprobs has 2 entries"),
        ({"policy_versions": [-1, 3, 3, -1, -1]}, "generated token 4 has version -1"),
        ({"logprobs": [0.0, -0.5, 0.3, 0.0, -2.0]}, "generated token 2"),
        ({"logprobs": [-1.0, -0.5, -0.1, 0.0, -2.0]}, "token 0 has loss mask 0"),
        ({"loss_mask": [0, 1, 2, 0, 1]}, "loss_mask[2] is 2"),
        ({"return_": 7.0}, "turn rewards sum to 1.5"),
        ({"terminated": False}, "finish_reason is 'terminated' but terminated is False"),
        ({"finish_reason": "truncated"}, "finish_reason is 'truncated' but truncated is False"),
    ],
)
def test_trajectory_rejects_inconsistent_data(overrides, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_trajectory(**overrides)


def test_trajectory_rejects_bad_spans():
    past_end = Turn(index=0, action="x", reward=1.5, action_span=Span(start=4, end=9))
    with pytest.raises(ValidationError, match="past the 5 tokens"):
        make_trajectory(turns=[past_end])
    over_prompt = Turn(index=0, action="x", reward=1.5, action_span=Span(start=0, end=2))
    with pytest.raises(ValidationError, match="loss mask 0"):
        make_trajectory(turns=[over_prompt])
    with pytest.raises(ValidationError, match="before its start"):
        Span(start=3, end=1)
    obs_over_action = Turn(index=0, action="x", reward=1.5, action_span=Span(start=1, end=2), observation_span=Span(start=2, end=4))
    with pytest.raises(ValidationError, match="observation span holds tokens with loss mask 1"):
        make_trajectory(turns=[obs_over_action])
    misnumbered = [Turn(index=1, action="x", reward=1.5, action_span=Span(start=1, end=3))]
    with pytest.raises(ValidationError, match="numbered 0, 1, 2"):
        make_trajectory(turns=misnumbered)


def test_unknown_fields_and_roles_are_errors():
    with pytest.raises(ValidationError, match="extra"):
        Task(id="x", prompt="p", promtp="typo")
    with pytest.raises(ValidationError):
        Message(role="robot", content="hi")
