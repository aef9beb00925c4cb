"""`make demo` says what it does before its first step: pre-training the testbed model takes minutes on a cold cache."""

import pytest

from srpo_trl import demo


class Stop(Exception):
    pass


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached"])
def test_the_demo_says_whether_it_pre_trains_before_it_does(tmp_path, monkeypatch, capsys, cached):
    monkeypatch.setenv("SRPO_TESTBED_CACHE", str(tmp_path))
    if cached:
        (tmp_path / demo.config_hash(demo.PretrainConfig())).mkdir()

    def pretrained_testbed_model():
        raise Stop  # what the demo printed before here is what a user reads for the next minutes

    monkeypatch.setattr(demo, "pretrained_testbed_model", pretrained_testbed_model)
    with pytest.raises(Stop):
        demo.main([])
    said = capsys.readouterr().out
    assert ("Pre-training the tiny testbed model" in said and "about two minutes" in said) is not cached
    assert ("Loading the testbed model from its cache" in said) is cached


def test_the_real_model_demo_holds_out_sums_and_reads_the_last_number():
    data = demo.one_digit_additions(seed=0)
    questions = [row["prompt"][-1]["content"] for split in ("train", "test") for row in data[split]]
    assert len(data["test"]) == 16 and len(set(questions)) == len(questions) == 81
    assert data["test"].to_list() == demo.one_digit_additions(seed=0)["test"].to_list()
    assert data["test"].to_list() != demo.one_digit_additions(seed=1)["test"].to_list()
    texts = ["3 + 4 = 7", "7", "3 + 4 is 8", "seven", "The sum of 3 and 4 is 7."]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    assert demo.last_number_reward(completions, ["7"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
