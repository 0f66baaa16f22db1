"""The training loop behind `peftkit train`, on accelerate (one process, or DDP over N).

The data order is a pure function of (seed, step): every process derives the same
global batch of `batch_size * num_processes` examples and takes its own slice, so
a resumed run replays exactly the batches an uninterrupted one would have seen,
and a 2-process run sees the same global batches as a 1-process run with twice
the batch size. Only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.errors import ConfigError
from peftkit.files import atomic_directory
from peftkit.record import DEFAULT_ADAPTER, adapter_methods
from peftkit.saving import save_adapter
from peftkit.training.assembly import Assembled, assemble
from peftkit.training.checkpoint import Checkpoint, find_resume_checkpoint, restore_checkpoint, save_checkpoint
from peftkit.training.config import RunConfig, TrainingConfig
from peftkit.training.data import (
    IGNORE_INDEX,
    Datasets,
    Example,
    collate,
    count_steps,
    generation_prompt,
    global_batch,
    load_datasets,
    process_batches,
)
from peftkit.training.distributed import (
    check_offload,
    check_resume_strategy,
    full_optimizer_state,
    gathered_adapter,
    lockstep,
    resolve_strategy,
    restore_sharded,
)
from peftkit.training.memory import StepMemory, counting, headline
from peftkit.training.metrics import METRICS_NAME, GenerationsLine, StepLine, Summary, ValidationLine
from peftkit.training.models import check_model_source, generate_text, load_tokenizer, transformers_bars
from peftkit.training.optim import build_optimizer, loraplus_param_groups
from peftkit.training.rundir import (
    check_new_run,
    check_resume,
    data_digests,
    probe_output,
    start_writing,
    writing,
)
from peftkit.training.simulate import Simulation
from peftkit.units import format_bytes

__all__ = ["TrainResult", "train"]


@dataclasses.dataclass
class TrainResult:
    """The trained model (adapter attached, unwrapped from DDP) and the end summary."""

    model: nn.Module
    summary: dict[str, Any]


class _Run:
    """One training run's state and its reporting; `train()` is the public entry point."""

    def __init__(self, config: RunConfig, quiet: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.quiet = config, quiet
        if config.training.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("training.mixed_precision 'fp16' needs a GPU; use 'no' or 'bf16' on CPU.")
        # On a CPU-only machine launched with torchrun, Accelerator must be told cpu=True,
        # or every process believes it is rank 0 and nothing synchronises.
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.training.mixed_precision)
        self.main = self.acc.is_main_process
        self.strategy = resolve_strategy(config.training.distributed, self.acc.num_processes)
        self.sharded = self.strategy == "fsdp"
        check_offload(config.training.distributed, self.acc.device)
        self.out = Path(config.output.dir)
        self.metrics_path = self.out / METRICS_NAME
        set_seed(config.training.seed)
        self.bar: tqdm | None = None
        self.tokenizer: Any = None
        self.pad_id = 0
        self.measured_peak = 0  # live tensor bytes of steps 1-2 on CPU
        self.val_before: float | None = None  # the validation loss before the first step

    def say(self, message: str) -> None:
        if self.main and not self.quiet:
            (self.bar.write if self.bar is not None else print)(message)

    def log(self, record: dict[str, Any] | StepLine | ValidationLine | GenerationsLine | Summary) -> None:
        """Append one line to metrics.jsonl; a failed write is cut back off, leaving whole lines only."""
        if isinstance(record, Summary):
            record = record.line()
        elif dataclasses.is_dataclass(record):
            record = dataclasses.asdict(record)
        if self.main:
            with writing(self.out), open(self.metrics_path, "a", encoding="utf-8") as handle:
                end = handle.tell()
                try:
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                except OSError:
                    handle.truncate(end)
                    raise

    def evaluate(self, wrapper: nn.Module, examples: list[Example]) -> float | None:
        """Token-weighted validation loss over all processes' shards."""
        if not examples:
            return None
        wrapper.eval()
        totals = torch.zeros(2, device=self.acc.device)
        batches = list(
            process_batches(examples, self.config.eval.batch_size, self.acc.process_index, self.acc.num_processes)
        )
        steps = lockstep(batches, examples[:1], self.acc) if self.sharded else ((batch, True) for batch in batches)
        with torch.no_grad():
            for batch, counts in steps:
                tensors = {k: v.to(self.acc.device) for k, v in collate(batch, self.pad_id).items()}
                count = (tensors["labels"][:, 1:] != IGNORE_INDEX).sum() * counts
                totals += torch.stack([wrapper(**tensors).float() * count, count.float()])
        wrapper.train()
        totals = self.acc.reduce(totals, reduction="sum")
        return (totals[0] / totals[1]).item()

    def validate(self, wrapper: nn.Module, examples: list[Example], step: int) -> float | None:
        """Evaluate, log and report the validation loss at `step`."""
        loss = self.evaluate(wrapper, examples)
        if loss is not None:
            self.log(ValidationLine(step, loss, math.exp(loss)))
            self.say(f"step {step}: validation loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        return loss

    def generations(self, model: nn.Module, records: list[dict[str, Any]], step: int, label: str) -> None:
        if not self.main or not self.config.eval.generations:
            return
        samples = []
        for record in records:
            pair = generation_prompt(record, self.tokenizer)
            if pair is None:
                continue
            output = generate_text(model, self.tokenizer, pair[0], self.config.eval.max_new_tokens)
            samples.append({"prompt": pair[0], "reference": pair[1], "output": output})
            if len(samples) == self.config.eval.generations:
                break
        self.log(GenerationsLine(step, samples))
        for sample in samples:
            self.say(
                f"[{label}, step {step}] {sample['prompt']!r}\n  -> {sample['output']!r}\n"
                f"  reference: {sample['reference']!r}"
            )

    def check_before_loading(
        self, resume: str | bool | None, overwrite: bool
    ) -> tuple[Checkpoint | None, list[str], bool]:
        """What can fail before anything loads: the model's name, the output directory, the checkpoint.

        Returns the checkpoint to resume (read whole), the newer ones skipped as unreadable, and
        whether the run continues in its own directory (else that directory must hold no run).
        """
        check_model_source(self.config.model.name)
        probe_output(self.out)
        resume_from, skipped = find_resume_checkpoint(resume, self.out, self.say) if resume else (None, [])
        continues = resume_from is not None and self.out.resolve() in resume_from.path.resolve().parents
        if not continues:
            check_new_run(self.out, overwrite)
        return resume_from, skipped, continues

    def estimated_step(self) -> StepMemory | None:
        """The simulated peak of one step (the main process says it); None, saying why, if it cannot be simulated.

        The estimate only informs: a model the simulation cannot run still trains. A ConfigError
        (a model that cannot be had or built) is the run's own error, said now rather than after loading.
        """
        if not self.main:
            return None
        try:
            step = Simulation(self.config, self.acc.device.type).step()
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - any other failure of the simulation leaves the run as it was
            self.say(f"estimate: not available ({type(error).__name__}: {str(error).splitlines()[0]})")
            return None
        self.say(headline(step))
        return step

    def initialize_from_data(self, model: nn.Module, train_set: list[Example]) -> None:
        """Let a data-driven init (EVA) read the run's first global batches, the same on every process."""
        method = adapter_methods(model)[DEFAULT_ADAPTER]
        if not method.needs_data():
            return
        tc = self.config.training
        per_global = tc.batch_size * self.acc.num_processes

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for step in itertools.count():
                indices = global_batch(step, 0, 1, len(train_set), per_global, tc.seed)
                batch = collate([train_set[i] for i in indices], self.pad_id)
                yield {key: value.to(self.acc.device) for key, value in batch.items()}

        method.initialize_from_data(model, DEFAULT_ADAPTER, batches())

    @contextmanager
    def measuring(self, model: nn.Module, optimizer: Any, done: int) -> Iterator[None]:
        """Count live tensor bytes over steps 1 and 2 on CPU (the allocator's own peak counts on a GPU);
        under fsdp, this process's: its shards, and the blocks it gathers while they are gathered."""
        if done > 2 or self.acc.device.type != "cpu":
            yield
            return
        with counting(model, getattr(optimizer, "optimizer", optimizer)) as counter:
            yield
        self.measured_peak = max(self.measured_peak, counter.peak_bytes())

    def measured_step_peak(self) -> int | None:
        if self.acc.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.acc.device)
        return self.measured_peak or None

    def train_step(
        self, wrapper: nn.Module, optimizer: Any, scheduler: Any, train_set: list[Example], step: int
    ) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss averaged over processes, tokens/s)."""
        acc, tc = self.acc, self.config.training
        accum, per_global = tc.gradient_accumulation_steps, tc.batch_size * acc.num_processes
        tick = time.perf_counter()
        tokens, step_loss = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for micro in range(accum):
            indices = global_batch(step, micro, accum, len(train_set), per_global, tc.seed)
            mine = indices[acc.process_index * tc.batch_size : (acc.process_index + 1) * tc.batch_size]
            batch = {k: v.to(acc.device) for k, v in collate([train_set[i] for i in mine], self.pad_id).items()}
            with acc.no_sync(wrapper) if micro < accum - 1 else nullcontext():  # sync gradients once per step
                loss = wrapper(**batch) / accum
                acc.backward(loss)
            step_loss += loss.detach()
            tokens += batch["attention_mask"].sum()
        if tc.max_grad_norm:
            acc.clip_grad_norm_(wrapper.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = acc.reduce(step_loss, reduction="mean").item()
        return mean_loss, acc.reduce(tokens, reduction="sum").item() / (time.perf_counter() - tick)

    def say_summary(self, summary: Summary, window: int) -> None:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        estimated, measured = summary.estimated_step_peak_bytes, summary.measured_step_peak_bytes
        gpu = torch.cuda.is_available()
        memory = f"{'GPU peak allocated' if gpu else 'process peak RSS'} {format_bytes(summary.peak_memory_bytes)}"
        if measured:
            where = "allocated on the GPU" if gpu else "live tensors, steps 1-2"
            memory += f", training step peak {format_bytes(measured)} measured ({where})"
            if estimated:
                memory += f" / {format_bytes(estimated)} estimated (full-length sequences, every token labelled)"
        self.say(
            f"done in {summary.time_s:.0f} s | {memory} | "
            f"train loss {fmt(summary.train_loss)} (mean of last {window} steps) | "
            f"validation loss {fmt(summary.val_loss_start)} -> {fmt(summary.val_loss)} | "
            f"adapter: {summary.adapter}"
        )


def _dropped(datasets: Datasets, max_length: int) -> str:
    """ " (dropped ...)" for the header line, naming each split's dropped rows and why; "" when none were."""
    said = [f"{name}: {r.describe(max_length)}" for name, r in datasets.reports.items() if r.describe(max_length)]
    return f" (dropped from {'; '.join(said)})" if said else ""


def _peak_memory_bytes() -> int:
    """Peak GPU memory allocated, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _optimizer(model: nn.Module, tc: TrainingConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """`training.optimizer` over the trainable parameters, with warmup then the configured schedule."""
    from transformers import get_scheduler

    params = _param_groups(model, tc) or [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc.optimizer, tc.learning_rate, tc.weight_decay)
    schedule = "constant_with_warmup" if tc.schedule == "constant" else tc.schedule
    return optimizer, get_scheduler(
        schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total_steps
    )


def _param_groups(model: nn.Module, tc: TrainingConfig) -> list[dict[str, Any]] | None:
    """LoRA+'s parameter groups when `training.loraplus_lr_ratio` is set, else None (one group)."""
    if tc.loraplus_lr_ratio is None:
        return None
    method = adapter_methods(model)[DEFAULT_ADAPTER]
    roles = method.parameter_roles(model, DEFAULT_ADAPTER)
    if roles is None:
        raise ConfigError(
            f"training.loraplus_lr_ratio needs a method of low-rank pairs A, B (lora, dora, qlora, qdora, ...); "
            f"{method.name} has none. Drop loraplus_lr_ratio."
        )
    return loraplus_param_groups(
        model, roles, tc.learning_rate, tc.loraplus_lr_ratio, tc.weight_decay, tc.loraplus_lr_embedding
    )


def train(
    config: RunConfig, resume: str | bool | None = None, quiet: bool = False, overwrite: bool = False
) -> TrainResult:
    """Fine-tune as `config` says; the summary is also printed unless `quiet`.

    `resume` continues from a checkpoint of this config (True: the run's newest); `overwrite`
    deletes another run's state in the output directory first, which is refused otherwise.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite deletes it; give one.")
    run = _Run(config, quiet)
    with transformers_bars(enabled=run.main and not quiet):
        return _train(run, resume, overwrite)


@dataclasses.dataclass
class _Prepared:
    """Everything the step loop needs, made once by `_prepare`."""

    built: Assembled  # the model (unwrapped), the loss module as accelerate prepared it, the optimizer
    datasets: Datasets
    total_steps: int
    start: int  # the step the loop starts after (the resumed one, else 0)
    sequences: int  # per optimizer step, all processes together
    digests: dict[str, str]
    estimated: StepMemory | None
    started: float


def _train(run: _Run, resume: str | bool | None, overwrite: bool) -> TrainResult:
    prepared = _prepare(run, resume, overwrite)
    losses = _step_loop(run, prepared)
    return _finish(run, prepared, losses)


def _prepare(run: _Run, resume: str | bool | None, overwrite: bool) -> _Prepared:
    """Check, load the data and the model, adapt it, build the optimizer, restore a checkpoint, open the run
    directory and say what will run; the validation loss and samples before the first step."""
    config = run.config
    acc, tc = run.acc, config.training
    resume_from, skipped, continues = run.check_before_loading(resume, overwrite)
    started = time.perf_counter()
    run.tokenizer = load_tokenizer(config.model.name)
    run.pad_id = run.tokenizer.pad_token_id
    datasets = load_datasets(config.data, run.tokenizer, tc.seed)
    train_set, valid_set = datasets.train, datasets.validation
    total_steps = count_steps(tc, len(train_set), acc.num_processes)
    datasets.reports["train"].left_out_per_epoch = len(train_set) % (tc.batch_size * acc.num_processes)
    sequences = tc.batch_size * acc.num_processes * tc.gradient_accumulation_steps
    digests = data_digests(config.data)
    changed = check_resume(resume_from, config.to_dict(), digests, sequences, total_steps) if resume_from else ""
    if resume_from is not None:
        check_resume_strategy(resume_from.state, run.strategy, acc.num_processes, str(resume_from.path))
    estimated = run.estimated_step()  # before the model loads: a run too large for the device is told first
    built = assemble(
        config,
        acc,
        run.sharded,
        lambda m: run.initialize_from_data(m, train_set),
        lambda m: _optimizer(m, tc, total_steps),
    )
    start = 0
    if resume_from is not None:
        restore = restore_sharded if run.sharded else restore_checkpoint
        restore(resume_from, built.model, built.optimizer, built.scheduler)
        start = resume_from.step
    acc.wait_for_everyone()  # every process has checked the directory before the main one changes it
    discarded: list[str] = []
    if run.main:
        discarded, dropped = start_writing(run.out, config.to_dict(), overwrite, start if continues else None)
        if discarded:
            run.say(f"--resume: deleted {', '.join(discarded)}, past the resumed step {start}.")
        if dropped:
            run.say(f"--resume: dropped {dropped} line(s) past step {start} from metrics.jsonl; they are logged anew.")
    trainable, total = built.trainable, built.total
    run.say(
        f"peftkit: {config.method.name} on {config.model.name} | trainable {trainable:,} / {total:,} params "
        f"({100 * trainable / total:.2f}%) | base weights {built.base_bytes / 1e9:.2f} GB | {len(train_set)} train / "
        f"{len(valid_set)} val examples{_dropped(datasets, config.data.max_length)} | "
        f"{total_steps} steps x {sequences} sequences | "
        f"{acc.num_processes} process(es) on {acc.device}"
        + (f" | resumed from {resume_from.path} at step {start}" if resume_from else "")
        + (f" with changed options: {changed}" if changed else "")
    )
    if resume_from is not None:
        resumed = {"resumed_from": str(resume_from.path), "skipped": skipped, "deleted": discarded, "changed": changed}
        run.log({"step": start, **resumed})
    run.log({"step": start, "data": {name: dataclasses.asdict(r) for name, r in datasets.reports.items()}})
    return _Prepared(built, datasets, total_steps, start, sequences, digests, estimated, started)


def _step_loop(run: _Run, p: _Prepared) -> list[float]:
    """The optimizer steps after `p.start`, with their logging, validation and checkpoints; the step losses."""
    config, tc = run.config, run.config.training
    run.val_before = run.validate(p.built.wrapper, p.datasets.validation, p.start)
    run.generations(p.built.model, p.datasets.validation_records, p.start, "before")
    p.built.wrapper.train()
    losses: list[float] = []
    bar_off = run.quiet or not run.main
    run.bar = tqdm(total=p.total_steps, initial=p.start, disable=bar_off, desc="train", dynamic_ncols=True)
    for done in range(p.start + 1, p.total_steps + 1):
        with run.measuring(p.built.model, p.built.optimizer, done - p.start):
            loss, tokens_per_s = run.train_step(
                p.built.wrapper, p.built.optimizer, p.built.scheduler, p.datasets.train, done - 1
            )
        losses.append(loss)
        lr = p.built.scheduler.get_last_lr()[0]
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if done % tc.log_every == 0 or done == p.total_steps:
            elapsed = time.perf_counter() - p.started
            run.log(StepLine(done, loss, lr, tokens_per_s, elapsed))
        if config.eval.every and done % config.eval.every == 0 and done < p.total_steps:
            run.validate(p.built.wrapper, p.datasets.validation, done)
        if config.output.save_every and (done % config.output.save_every == 0 or done == p.total_steps):
            _checkpoint(run, p, done)
        run.acc.wait_for_everyone()
    run.bar.close()
    run.bar = None
    return losses


def _checkpoint(run: _Run, p: _Prepared, done: int) -> None:
    """Write checkpoint `done` from the main process; under fsdp every process first gathers its shards."""
    config = run.config
    adapter = gathered_adapter(p.built.model) if run.sharded else None
    optimizer = full_optimizer_state(p.built.model, p.built.optimizer.optimizer) if run.sharded else None
    if not run.main:
        return
    state = {
        "examples_seen": done * p.sequences,
        "config": config.to_dict(),
        "data_sha256": p.digests,
        "distributed": {"strategy": run.strategy, "num_processes": run.acc.num_processes},
    }
    with writing(run.out):
        save_checkpoint(
            run.out / "checkpoints",
            done,
            p.built.model,
            p.built.optimizer,
            p.built.scheduler,
            state,
            config.output.keep_last,
            adapter_state=adapter,
            optimizer_state=optimizer,
        )


def _finish(run: _Run, p: _Prepared, losses: list[float]) -> TrainResult:
    """The final validation and samples, the adapter written, the summary logged and said."""
    val_loss = run.validate(p.built.wrapper, p.datasets.validation, p.total_steps)
    run.generations(p.built.model, p.datasets.validation_records, p.total_steps, "after")
    gathered = gathered_adapter(p.built.model) if run.sharded else None  # collective: every process gathers
    if run.main:
        with writing(run.out), atomic_directory(run.out / "adapter", replace=True) as tmp:
            save_adapter(p.built.model, tmp, state_dict=gathered)
    run.acc.wait_for_everyone()
    window = losses[-10:]
    peak = _peak_memory_bytes()
    summary = Summary(
        steps=p.total_steps,
        time_s=round(time.perf_counter() - p.started, 1),
        peak_memory_bytes=peak,
        peak_memory_gb=round(peak / 1e9, 2),
        estimated_step_peak_bytes=p.estimated.peak_bytes if p.estimated else None,
        measured_step_peak_bytes=run.measured_step_peak(),
        train_loss=sum(window) / len(window) if window else None,
        val_loss_start=run.val_before,
        val_loss=val_loss,
        adapter=str(run.out / "adapter"),
    )
    run.log(summary)
    run.say_summary(summary, len(window))
    return TrainResult(p.built.model, dataclasses.asdict(summary))
