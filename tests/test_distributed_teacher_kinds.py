"""Teacher kinds under ZeRO-3 and FSDP2 (2 CPU processes): the same policy and teacher as one process."""

import pytest
from test_distributed import assert_same_run, launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["base", "live", "trust_region"])
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_teacher_kinds_end_with_the_single_process_weights(tmp_path, backend, kind):
    option = f"--teacher_model_kind={kind}"
    reference = launch(tmp_path / "single", "none", option)
    assert reference["log"][0]["srpo/loss/sdpo"] > 0.01, "the distillation term must weigh in the comparison"
    assert_same_run(launch(tmp_path / backend, backend, option), reference)


@pytest.mark.parametrize("kind", ["base", "trust_region"])
def test_fsdp2_resume_rebuilds_an_initial_weights_teacher_exactly(tmp_path, kind):
    # The policy is already the resumed one when the teacher is sharded: the teacher must keep its initial weights.
    options = ("--max_steps=4", f"--teacher_model_kind={kind}")
    straight = launch(tmp_path / "straight", "fsdp2", *options, "--save_steps=2")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resumed = launch(tmp_path / "resumed", "fsdp2", *options, f"--resume_from_checkpoint={checkpoint}")
    assert_same_run(resumed, straight, atol=0.0)
