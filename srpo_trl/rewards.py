"""What a reward function returns, checked where it returns it: one number (or None) per completion.

GRPOTrainer converts the output with `torch.tensor` after iterating it: a bare float fails with "'float' object is
not iterable", a string is iterated character by character, an `(n, 1)` array fails deep in torch. The wrapper
names the reward function, what it returned and what is expected."""

import functools
import numbers

import numpy
import torch
from torch import nn
from trl.trainer.utils import is_async_callable

EXPECTED = "a list with one number (or None for a completion it cannot score) per completion"


def _is_reward(value) -> bool:
    """One completion's reward as GRPOTrainer converts it: a number, a bool, None, or a one-element tensor/array."""
    if value is None or isinstance(value, (numbers.Real, numpy.bool_)):
        return True
    return isinstance(value, (torch.Tensor, numpy.ndarray)) and value.ndim == 0 and value.dtype != object


def _describe(value) -> str:
    if isinstance(value, (torch.Tensor, numpy.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def reward_output_problem(output, completions: int) -> str | None:
    """What is wrong with a reward function's `output` (a sequence, as `as_sequence` leaves it) for `completions`
    completions, or None. (A wrong length is GRPOTrainer's own, clear, error.)"""
    if isinstance(output, (torch.Tensor, numpy.ndarray)):
        return None if output.ndim == 1 else f"returned {_describe(output)}; expected {EXPECTED} ({completions} here)"
    if not isinstance(output, (list, tuple)):
        return f"returned {_describe(output)}; expected {EXPECTED} ({completions} here)"
    for index, value in enumerate(output):
        if not _is_reward(value):
            return (
                f"returned a {type(output).__name__} whose element {index} is {_describe(value)}; expected {EXPECTED} "
                f"({completions} here): convert it with float(...)"
            )
    return None


def as_sequence(output):
    """A reward function's output as GRPOTrainer may iterate it more than once: other iterables (a generator, a
    pandas Series) become a list, as GRPOTrainer's own iteration makes them; text, mappings and scalars stay, to be
    refused."""
    if isinstance(output, (list, tuple, torch.Tensor, numpy.ndarray, str, bytes, dict)):
        return output
    try:
        return list(output)
    except TypeError:  # not iterable: a bare number, None
        return output


def _checked_output(name: str, output, completions):
    output = as_sequence(output)
    problem = reward_output_problem(output, len(completions))
    if problem is not None:
        raise TypeError(f"The reward function '{name}' {problem}.")
    return output


def checked_reward_function(func, name: str):
    """`func`, with its output checked (`reward_output_problem`); sync or async as `func` is. Reward models (modules)
    are returned as they are: GRPOTrainer reads their logits."""
    if isinstance(func, nn.Module):
        return func
    if is_async_callable(func):

        @functools.wraps(func)
        async def checked_async(*args, **kwargs):
            return _checked_output(name, await func(*args, **kwargs), kwargs["completions"])

        return checked_async

    @functools.wraps(func)
    def checked(*args, **kwargs):
        return _checked_output(name, func(*args, **kwargs), kwargs["completions"])

    return checked
