"""The Keras callback and its run state."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from autoprec import backends
from autoprec.adaptive.rules import (
    CHECK_COLUMNS,
    CHECKS_FILE,
    EVENT_COLUMNS,
    HISTORY_FILE,
    POLICY_FILE,
    AdaptiveOptions,
    Event,
    Judge,
)
from autoprec.adaptive.sampler import Sampler
from autoprec.apply import set_policies_in_place
from autoprec.errors import ArgumentError, UnsupportedModelError, describe
from autoprec.formats import FLOAT32, LOW_PRECISION, MIXED_FLOAT16, resolve_target
from autoprec.formats import get as get_format
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph, keyed_layers
from autoprec.policy import PrecisionPolicy

if TYPE_CHECKING:
    from autoprec.data import EvalData

logger = logging.getLogger("autoprec")


def _start_policy(policy: Any, model: Any, graph: ModelGraph) -> dict[str, str]:
    """``{eligible path: policy}`` from the callback's ``policy`` argument, or the model's current policies."""
    if policy is None:
        layers = keyed_layers(model)
        return {i.path: layers[i.path].dtype_policy.name for i in graph.eligible}
    names = policy.for_graph(graph)
    return {i.path: names.get(i.path, FLOAT32) for i in graph.eligible}


def _pick_target(target: Any, policy: PrecisionPolicy | None, start: Mapping[str, str]) -> str:
    """The 16-bit format: ``target``, else the policy's, else the one the start policy uses, else float16."""
    used = sorted({name for name in start.values() if name in LOW_PRECISION})
    if target is None:
        target = (policy.target if policy is not None else None) or (used[0] if used else MIXED_FLOAT16)
    target = resolve_target(target)[0]
    if any(name != target for name in used):
        raise ArgumentError(
            f"Expected the starting policy's 16-bit layers to use target={target!r}. Received layers in "
            f"{used}. Pass target= to match them, or start from a policy with one 16-bit format."
        )
    return target


def _loss_scale_optimizer(model: Any) -> Any:
    optimizer = getattr(model, "optimizer", None)
    return optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None


def _require_loss_scale(model: Any, start: Mapping[str, str], target: str, demote: bool) -> None:
    """Refuse to train float16 layers without a LossScaleOptimizer (Keras cannot add one mid-fit)."""
    starts = any(name == MIXED_FLOAT16 for name in start.values())
    if not (starts or (demote and target == MIXED_FLOAT16)) or _loss_scale_optimizer(model) is not None:
        return
    why = "the starting policy has float16 layers" if starts else "demote=True may move layers to float16"
    raise ArgumentError(
        f"Expected the model to be compiled with keras.optimizers.LossScaleOptimizer, because {why}. Received: "
        f"optimizer={describe(getattr(model, 'optimizer', None))}. float16 gradients underflow without a loss scale, "
        "and an optimizer cannot be wrapped in the middle of fit without changing the object fit steps and model.save "
        "writes. Compile with `keras.optimizers.LossScaleOptimizer(optimizer)` (autoprec.apply_policy does it); it is "
        "harmless while every layer is float32."
    )


class _Run:
    """The state of training under the callback: graph, rules, sampler, data, loss scale and records."""

    def __init__(
        self,
        model: Any,
        policy: PrecisionPolicy | None,
        *,
        data: Any,
        target: Any,
        demote: bool,
        options: AdaptiveOptions,
        keep_float32: tuple[str, ...],
    ) -> None:
        from autoprec.data import EvalData

        self.model, self.options = model, options
        # Without data= the callback acts on the training signals alone: the loss scale, skipped steps and a
        # non-finite loss (Keras shows a callback neither the batches fit trains on nor their activations).
        self.data = (
            EvalData.get(data, batch_size=options.batch_size, model=model, what="data") if data is not None else None
        )
        self._batches = self._cycle(self.data) if self.data is not None else None
        x, y = next(self._batches) if self._batches is not None else (None, None)
        self.graph = build_graph(model, keep_float32=keep_float32, sample=x)
        start = _start_policy(policy, model, self.graph)
        self.fmt = get_format(_pick_target(target, policy, start))
        # A tf.function reads variables by handle at every call; a jax.jit trace would keep the weights of
        # its first call, so on JAX (and PyTorch) the callback acts on the training signals alone.
        has_stats = self.graph.kind != SUBCLASSED and backends.name() == "tensorflow" and self.data is not None
        if demote and not has_stats:
            raise UnsupportedModelError(
                f"Expected a Functional or Sequential model on TensorFlow for demote=True. Received a "
                f"{self.graph.kind} model on {backends.name()}: demotion needs per-layer statistics, which need a "
                "graph to walk and TensorFlow's traced pass. Pass demote=False (promotion on a non-finite loss or "
                "skipped steps still works)."
            )
        _require_loss_scale(model, start, self.fmt.name, demote)
        producers = {i.path: i.producers for i in self.graph.eligible}
        self.judge = Judge(producers, start, self.fmt, options, demote=demote)
        self.sampler = Sampler(model, self.graph, self.fmt, self._loss(x, y)) if has_stats else None
        self.events: list[Event] = []
        self.checks: list[dict[str, Any]] = []
        self.step = self.epoch = self.last_check = 0
        self.mark = 0  # the step at which `iterations` was read: skipped steps are counted from there
        self.apply()
        optimizer = _loss_scale_optimizer(model)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)  # its scale variable exists from the first step on anyway
        self.healthy_scale = self.scale() or 1.0
        self.iterations = self._iterations()

    def _cycle(self, data: EvalData) -> Iterator[tuple[Any, Any]]:
        """The batches of ``data`` over and over; smaller ones only when no batch is full.

        Gradients at layer outputs scale with one over the batch size, so a
        short last batch would judge them at another scale.
        """
        any_size = False
        while True:
            full = 0
            for x, y in data.batches():
                if any_size or len(keras.tree.flatten(y)[0]) == self.options.batch_size:
                    full += 1
                    yield x, y
            any_size = any_size or full == 0

    def _loss(self, x: Any, y: Any) -> Any:
        from autoprec.engine import to_numpy
        from autoprec.metrics import Metric, resolve_loss

        # The compiled loss, as profile differentiates it; the metric only matters for a model compiled without one.
        y_pred = to_numpy(self.model(x, training=False))
        return resolve_loss(self.model, Metric("loss", False, lambda *_: math.nan), y, y_pred)

    # Loss scale -------------------------------------------------------------
    def scale(self) -> float | None:
        optimizer = _loss_scale_optimizer(self.model)
        return None if optimizer is None else float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))

    def _set_scale(self, value: float) -> None:
        _loss_scale_optimizer(self.model).dynamic_scale.assign(value)

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0

    # Policies ---------------------------------------------------------------
    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy(
            self.graph.resolve(self.judge.assignment), target=self.fmt.name, layers=self.graph.layer_facts()
        )

    def apply(self) -> bool:
        """Set the current assignment on the model's layers; rebuild its functions when anything changed."""
        changed = set_policies_in_place(self.model, self.graph.resolve(self.judge.assignment))
        if changed:
            self.model.make_train_function(force=True)
            self.model.test_function = self.model.predict_function = None  # rebuilt on their next use
        return changed

    def layers_16bit(self) -> int:
        return sum(name in LOW_PRECISION for name in self.judge.assignment.values())

    # A check ----------------------------------------------------------------
    def check(self, *, trigger: str, loss: float | None) -> list[Event]:
        """Read the loss scale and skipped steps, sample statistics, and apply what the rules decide."""
        started = time.perf_counter()
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:  # JAX keeps the variables in a state tuple during an epoch
            sync()
        scale, iterations = self.scale(), self._iterations()
        skipped = max(0, (self.step - self.mark) - (iterations - self.iterations)) if scale is not None else 0
        nonfinite = trigger == "nonfinite_loss"
        if scale is not None and skipped == 0 and not nonfinite:
            self.healthy_scale = scale
        # Gradients are judged at the healthy scale, capped at the initial one: the scale keeps doubling
        # while no layer is float16, and is set back to the initial one when float16 layers return.
        judged = min(self.healthy_scale, _loss_scale_optimizer(self.model).initial_scale) if scale else 1.0
        rows: Mapping[str, Mapping[str, float]] = {}
        sample_loss = math.nan
        if self.sampler is not None and self._batches is not None:  # a sampler exists only with data
            rows, sample_loss = self.sampler(*next(self._batches), judged)
        ratio = min(1.0, scale / judged) if scale else 1.0
        had_float16 = any(n == MIXED_FLOAT16 for n in self.judge.assignment.values())
        events = self.judge.decide(
            rows, step=self.step, epoch=self.epoch, skipped=skipped, nonfinite_loss=nonfinite, scale_ratio=ratio
        )
        if events:
            self._after_change(events, scale, skipped=skipped > 0, nonfinite=nonfinite, had_float16=had_float16)
        elif nonfinite:
            logger.warning(
                "autoprec: the loss turned non-finite at step %d and no 16-bit layer is left to blame: the "
                "model diverges in float32 too (lower the learning rate, or check the data).",
                self.step,
            )
        self.last_check, self.mark, self.iterations = self.step, self.step, iterations  # a change steps no optimizer
        self.record(trigger, loss, skipped=skipped, sample_loss=sample_loss, seconds=time.perf_counter() - started)
        return events

    def record(
        self,
        trigger: str,
        loss: float | None,
        *,
        skipped: int | None = None,
        sample_loss: float = math.nan,
        seconds: float = 0.0,
    ) -> None:
        """One row of :attr:`AdaptivePrecision.checks`: a check, or the loss and scale at an epoch's end."""
        self.checks.append(
            {
                "step": self.step,
                "epoch": self.epoch,
                "trigger": trigger,
                "loss": math.nan if loss is None else loss,
                "sample_loss": sample_loss,
                "loss_scale": self.scale(),
                "skipped_steps": skipped,
                "layers_16bit": self.layers_16bit(),
                "seconds": seconds,
            }
        )

    def _after_change(
        self, events: list[Event], scale: float | None, *, skipped: bool, nonfinite: bool, had_float16: bool
    ) -> None:
        self.apply()
        self.events.extend(events)
        if scale is not None:
            has_float16 = any(n == MIXED_FLOAT16 for n in self.judge.assignment.values())
            optimizer = _loss_scale_optimizer(self.model)
            if (skipped or nonfinite) and scale < self.healthy_scale:
                self._set_scale(self.healthy_scale)  # the halvings were the promoted layers' doing
            elif has_float16 and not had_float16 and scale > optimizer.initial_scale:
                self._set_scale(optimizer.initial_scale)  # it grew while no layer needed it
                self.healthy_scale = optimizer.initial_scale
        if nonfinite:
            # Keras logs the loss averaged since the epoch began: restart the averages at the fix,
            # or a non-finite step would hide every later one until the epoch ends.
            self.model.reset_metrics()


# ---------------------------------------------------------------------------
# The callback


class AdaptivePrecision(keras.callbacks.Callback):
    """Move layers between 16-bit and float32 while ``model.fit`` trains (see the module docstring for the rules).

    Args:
        policy: the policy to start from: a :class:`~autoprec.PrecisionPolicy`, a
            :class:`~autoprec.TuneResult`, anything ``PrecisionPolicy.get`` accepts,
            or None for the model's current layer policies.
        data: training data to sample range statistics from, ``(x, y)`` arrays or
            a dataset. Without it the callback watches the training it is given
            through its signals alone: the loss scale, skipped steps and a
            non-finite loss, promoting the 16-bit layer closest to the limits by
            the policy's profile order (``demote=True`` needs ``data``).
        target: the 16-bit policy layers are demoted to and judged against
            (``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"auto"``); default:
            the policy's, else the one its layers use, else float16.
        demote: try float32 layers in 16-bit when their statistics allow.
        keep_float32: layer paths or regexes never moved to 16-bit.
        verbose: 1 prints a line per change, 0 only logs it.
        **options: the cadence and thresholds, see :class:`AdaptiveOptions`
            (``check_every=100``, ``batch_size=32``, ``promote_at=0.5``, ...).

    The events also go to the Keras logs: ``autoprec_changes`` at the batch
    of a change, and ``autoprec_changes``, ``autoprec_16bit_layers`` and
    ``autoprec_loss_scale`` at every epoch's end, so ``History``, ``CSVLogger``
    and ``TensorBoard`` record them when listed after this callback.

    Attributes:
        history: the changes, one row per event (``EVENT_COLUMNS``).
        checks: one row per check: loss, loss scale, skipped steps, seconds spent.
        policy: the current :class:`~autoprec.PrecisionPolicy`.

    Example:
        >>> callback = AdaptivePrecision(result, data=(x_train, y_train), demote=True)  # doctest: +SKIP
        >>> model.fit(x_train, y_train, epochs=10, callbacks=[callback])              # doctest: +SKIP
        >>> callback.history[["step", "layer", "direction", "reason"]]               # doctest: +SKIP
        >>> callback.save("runs/adaptive")                                           # doctest: +SKIP
    """

    def __init__(
        self,
        policy: Any = None,
        *,
        data: Any = None,
        target: str | None = None,
        demote: bool = False,
        keep_float32: Any = (),
        verbose: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(AdaptiveOptions)})
        if unknown:
            raise ArgumentError(
                f"Expected options among {[f.name for f in dataclasses.fields(AdaptiveOptions)]}. Received: {unknown}."
            )
        self.options = AdaptiveOptions(**options)
        self._policy = _policy_argument(policy)
        if target is not None and target not in (*LOW_PRECISION, "auto"):
            raise ArgumentError(
                f"Expected target to be one of {[*LOW_PRECISION, 'auto']} or None. Received: target={describe(target)}."
            )
        if not isinstance(demote, bool):
            raise ArgumentError(f"Expected demote to be True or False. Received: demote={describe(demote)}.")
        if demote and data is None:
            raise ArgumentError(
                "Expected data=(x, y) of training samples with demote=True: moving a layer back to 16-bit "
                "needs its range statistics, sampled from data. Received: data=None. Pass data=, or "
                "demote=False (promotion on a non-finite loss or skipped steps needs no data)."
            )
        if verbose not in (0, 1) or isinstance(verbose, float):
            raise ArgumentError(f"Expected verbose to be 0 or 1. Received: verbose={describe(verbose)}.")
        if isinstance(keep_float32, str):
            keep_float32 = (keep_float32,)
        if not isinstance(keep_float32, (list, tuple)) or not all(isinstance(k, str) for k in keep_float32):
            raise ArgumentError(
                f"Expected keep_float32 to be a list of layer paths or regexes. "
                f"Received: keep_float32={describe(keep_float32)}."
            )
        self._keep = tuple(keep_float32)
        self._data, self._target, self._demote, self._verbose = data, target, demote, verbose
        self._run: _Run | None = None
        self._epoch_start, self._nonfinite = 0, False

    # Results ----------------------------------------------------------------
    @property
    def policy(self) -> PrecisionPolicy | None:
        """The current policy (None before training when it is read from the model)."""
        return self._run.policy if self._run is not None else self._policy

    @property
    def history(self):
        """Every change so far as a DataFrame: step, layer, direction, before, after, reason, statistic, why."""
        import pandas as pd

        return pd.DataFrame([e.to_dict() for e in self._run.events] if self._run else [], columns=list(EVENT_COLUMNS))

    @property
    def checks(self):
        """One row per check and per epoch end (``trigger``).

        The columns: logged and sampled loss, loss scale, skipped steps, seconds.
        """
        import pandas as pd

        return pd.DataFrame(self._run.checks if self._run else [], columns=list(CHECK_COLUMNS))

    def save(self, directory: str | os.PathLike, *, report: bool = True) -> list[str]:
        """Write the policy (``adaptive_policy.json``), the history and the checks, and the report.

        Other files in ``directory`` (a saved tune result) are kept; the report then shows both.

        Raises:
            OutputError: the directory cannot be written.

        Example:
            >>> callback.save("runs/adaptive")  # doctest: +SKIP
        """
        from autoprec.files import check_output_directory, write_text_atomic

        if self._run is None:
            raise ArgumentError("Expected a callback that has trained. Received one before fit; call model.fit first.")
        folder = check_output_directory(directory)
        os.makedirs(folder, exist_ok=True)
        self._run.policy.save(os.path.join(folder, POLICY_FILE))
        for name, frame in ((HISTORY_FILE, self.history), (CHECKS_FILE, self.checks)):
            write_text_atomic(os.path.join(folder, name), frame.to_csv(index=False), what="adaptive history")
        paths = [os.path.join(folder, n) for n in (POLICY_FILE, HISTORY_FILE, CHECKS_FILE)]
        if report:
            from autoprec.report.pages import write_report

            paths += write_report(folder)
        return paths

    # Keras hooks ------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._run is None or self._run.model is not self.model:
            self._run = _Run(
                self.model,
                self._policy,
                data=self._data,
                target=self._target,
                demote=self._demote,
                options=self.options,
                keep_float32=self._keep,
            )
        # Steps count on across fit calls, so checks keep their cadence; the optimizer may have
        # stepped in between (a fit without this callback), so its count is read again.
        self._run.mark, self._run.iterations = self._run.step, self._run._iterations()
        self._run.record("train_begin", None)

    def _started(self) -> _Run:
        if self._run is None:  # Keras calls on_train_begin before any other hook of fit
            raise RuntimeError("Expected on_train_begin to run before the other hooks of fit.")
        return self._run

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        run = self._started()
        run.epoch, self._epoch_start, self._nonfinite = epoch, run.step, False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        run = self._started()
        run.step = self._epoch_start + batch + 1
        loss = (logs or {}).get("loss")
        loss = float(loss) if isinstance(loss, (int, float, np.floating)) else None
        trigger = None
        if loss is not None and not math.isfinite(loss) and not self._nonfinite:
            trigger, self._nonfinite = "nonfinite_loss", True
        elif run.step - run.last_check >= self.options.check_every:
            trigger = "scheduled"
        if trigger is None:
            return
        events = run.check(trigger=trigger, loss=loss)
        if events:
            if trigger == "nonfinite_loss":
                self._nonfinite = False  # the averages restarted: a later non-finite loss is news again
            self._report(events)
            if logs is not None:
                logs["autoprec_changes"] = float(len(events))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        run = self._started()
        loss = (logs or {}).get("loss")
        run.record("epoch_end", float(loss) if isinstance(loss, (int, float, np.floating)) else None)
        if logs is None:
            return
        logs["autoprec_16bit_layers"] = float(run.layers_16bit())
        logs["autoprec_changes"] = float(sum(e.epoch == epoch for e in run.events))
        scale = run.scale()
        if scale is not None:
            logs["autoprec_loss_scale"] = scale

    def _report(self, events: list[Event]) -> None:
        for e in events:
            line = f"autoprec: step {e.step}: {e.direction} {e.layer!r} ({e.why})"
            logger.info(line)
            if self._verbose:
                print(line)


def _policy_argument(policy: Any) -> PrecisionPolicy | None:
    if policy is None:
        return None
    inner = getattr(policy, "policy", None)  # a TuneResult
    if isinstance(inner, PrecisionPolicy):
        return inner
    return PrecisionPolicy.get(policy)
