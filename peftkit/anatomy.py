"""Facts about a model's parts that several subsystems need: one home for each.

Its output head, its randomly initialised task head, its task type as PEFT names
it, its attention projections, and which parameters are shared (tied) between modules.
"""

from __future__ import annotations

from torch import nn

from peftkit.weights import is_linear

__all__ = ["attention_projections", "output_head", "output_head_path", "task_heads", "task_type", "tied_parameters"]

# Per model-class suffix: PEFT's task type, and the task heads that start random and so
# always train and save with the adapter (as PEFT does for SEQ_CLS, TOKEN_CLS, QUESTION_ANS).
_TASKS: dict[str, tuple[str, list[str]]] = {
    "ForCausalLM": ("CAUSAL_LM", []),
    "ForSequenceClassification": ("SEQ_CLS", ["classifier", "score"]),
    "ForTokenClassification": ("TOKEN_CLS", ["classifier", "score"]),
    "ForQuestionAnswering": ("QUESTION_ANS", ["qa_outputs"]),
    "ForConditionalGeneration": ("SEQ_2_SEQ_LM", []),
}


def _task(model: nn.Module) -> tuple[str, list[str]] | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)


def task_type(model: nn.Module) -> str | None:
    """PEFT's `task_type` for the model's class (`CAUSAL_LM`, `SEQ_CLS`, ...), or None."""
    task = _task(model)
    return task[0] if task else None


def task_heads(model: nn.Module) -> list[str]:
    """Names of the randomly initialised task head of a transformers task model, if any."""
    task = _task(model)
    return [name for name in (task[1] if task else []) if isinstance(getattr(model, name, None), nn.Module)]


def output_head(model: nn.Module) -> nn.Module | None:
    """The language-model head (`get_output_embeddings()`), or None for models without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def output_head_path(model: nn.Module) -> str | None:
    """Where `output_head(model)` lives in the model, or None."""
    head = output_head(model)
    return next((name for name, module in model.named_modules() if head is not None and module is head), None)


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every path it appears under, for parameters shared by several modules."""
    paths: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(name)
    return {key: names for key, names in paths.items() if len(names) > 1}


def attention_projections(model: nn.Module) -> list[str]:
    """Paths of the linear layers inside the model's attention blocks (query, key, value, output).

    Found by structure: transformers names every attention block's class `...Attention`
    (LlamaAttention, GPT2Attention, BertSelfAttention, T5Attention, ...), so no table
    per model type is needed.
    """
    blocks = [name for name, module in model.named_modules() if type(module).__name__.endswith("Attention")]
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module) and any(name.startswith(block + ".") for block in blocks)
    ]
