"""wanalpha.background: work on a helper thread that returns its value, hands its error to the caller, and stops at
its next checkpoint when asked (generate reads the weights there while its own thread prepares the GPU kernels)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from wanalpha import background
from wanalpha.background import Background, Stopped, checkpoint
from wanalpha.errors import WanAlphaError


def test_the_value_and_the_thread() -> None:
    seen = {}

    def work() -> int:
        seen["thread"] = threading.current_thread()
        checkpoint()  # not asked to stop: nothing
        return 7

    task = Background(work, torch.device("cpu"), name="read weights")
    assert task.result() == 7 and not task.failed.is_set()
    assert seen["thread"] is not threading.main_thread() and seen["thread"].name == "read weights"


@pytest.mark.parametrize(
    "error", [WanAlphaError("model.safetensors is truncated"), OSError(28, "No space"), KeyError("x")]
)
def test_its_error_is_raised_by_result_and_failed_is_set_at_once(error: BaseException) -> None:
    """The caller learns of a failure the moment it happens (`failed`, to end its own work early) and gets the very
    error from result(), whatever its class (WanAlphaError: the CLI's one-line message)."""

    def work() -> None:
        raise error

    task = Background(work)
    assert task.failed.wait(timeout=60)
    with pytest.raises(type(error)) as raised:
        task.result()
    assert raised.value is error


def test_stop_ends_the_work_at_its_next_checkpoint_and_waits_for_it() -> None:
    """stop() asks, and returns only once the work has ended: at the checkpoint after the unit in hand (no unit
    after it starts); what it raised (Stopped) is dropped."""
    entered, done, units = threading.Event(), threading.Event(), []

    def work() -> None:
        try:
            for unit in range(100):
                checkpoint()
                units.append(unit)
                if unit == 2:
                    entered.set()
                    asked = background._local.stop  # this thread's: set by stop()
                    while not asked.is_set():  # the unit in hand runs until it is asked to stop
                        asked.wait(timeout=60)
        finally:
            done.set()

    task = Background(work)
    assert entered.wait(timeout=60)
    task.stop()
    assert done.is_set() and units == [0, 1, 2] and task.failed.is_set()
    assert isinstance(task._error, Stopped)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_second_ctrl_c_while_stopping_waits_for_the_work_then_raises(quiet: bool, capsys) -> None:
    """A Ctrl-C during stop()'s wait does not leave the work running: the wait goes on (saying so, unless quiet: a
    multi-GPU run's processes after the first), and the KeyboardInterrupt is raised once the work has ended."""
    asked_then_ended = threading.Event()

    def work() -> None:
        asked = background._local.stop
        while not asked.is_set():
            asked.wait(timeout=60)
        time.sleep(0.2)  # the unit in hand still runs a while after the ask
        asked_then_ended.set()

    task = Background(work, name="read weights", quiet=quiet)
    join, interrupted = task._thread.join, []

    def join_interrupted(*args, **kwargs):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return join(*args, **kwargs)

    task._thread.join = join_interrupted
    with pytest.raises(KeyboardInterrupt):
        task.stop()
    assert interrupted and asked_then_ended.is_set() and not task._thread.is_alive()
    assert ("read weights: ending at its next step" in capsys.readouterr().err) is not quiet


def test_checkpoint_outside_background_work_does_nothing() -> None:
    checkpoint()  # the main thread: never asked to stop
    outcome = []

    def plain() -> None:
        try:
            checkpoint()
            outcome.append("ran on")
        except BaseException as error:  # noqa: BLE001 - the test's finding
            outcome.append(error)

    thread = threading.Thread(target=plain)  # a plain thread: likewise
    thread.start()
    thread.join()
    assert outcome == ["ran on"]


def test_moved_moves_every_tensor_a_leaf_at_a_time_and_stops_part_way() -> None:
    """background.moved: the result of module.to(device) (the leaves' tensors and a container's own), and inside
    Background work a stop asked during the move ends it at the next leaf: the leaves after it stay where they were."""
    from torch import nn

    from wanalpha.background import moved

    class Holder(nn.Module):  # a container with a parameter of its own
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.layers = nn.Sequential(*(nn.Linear(3, 3) for _ in range(4)))

    model = moved(Holder(), torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}

    started = threading.Event()

    class Slow(nn.Linear):  # its move waits until the caller asks the work to stop
        def _apply(self, fn, recurse=True):
            started.set()
            asked = background._local.stop
            while not asked.is_set():
                asked.wait(timeout=60)
            return super()._apply(fn, recurse)

    model = nn.Sequential(Slow(3, 3), *(nn.Linear(3, 3) for _ in range(3)))
    task = Background(lambda: moved(model, torch.device("meta")))
    assert started.wait(timeout=60)
    task.stop()
    assert model[0].weight.device.type == "meta"
    assert all(p.device.type == "cpu" for layer in model[1:] for p in layer.parameters())
