from envs import make_env


def test_echo_rewards_each_exact_repeat_and_ends_after_its_rounds():
    env = make_env("cwm_rl/Echo-v0", num_rounds=3)
    obs, _ = env.reset(seed=7)
    words = env.task.answer
    assert obs[0]["content"] == f"Repeat exactly: {words[0]}"
    obs, reward, terminated, _, _ = env.step(f"  {words[0]}\n")
    assert (reward, terminated) == (1.0, False)
    assert obs == [{"role": "user", "content": f"Repeat exactly: {words[1]}"}]
    assert env.step("wrong")[1] == 0.0
    _, reward, terminated, truncated, info = env.step(words[2])
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info == {"expected": words[2], "correct": True}
    assert env.episode_return == 2.0


def test_echo_seeds_reproduce_tasks():
    a, b = make_env("cwm_rl/Echo-v0"), make_env("cwm_rl/Echo-v0")
    assert a.reset(seed=11) == b.reset(seed=11)
    tasks = {a.reset(seed=s)[1]["task_id"] for s in range(10)}
    assert len(tasks) > 1
