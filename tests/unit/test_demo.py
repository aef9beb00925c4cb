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
