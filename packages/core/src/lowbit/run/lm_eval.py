"""lowbit checkpoints in lm-evaluation-harness (``pip install 'lowbit[eval]'``, lm-eval 0.4.x).

Importing this module registers the model class :class:`LowbitLM` under the name ``lowbit`` in
lm-eval's model registry. lm-eval 0.4 discovers no models from other packages (it has no entry-point
group for them, and ``--include_path`` adds tasks only), so its command line reaches lowbit through
this module run as a program, which registers the class and then hands its arguments to lm-eval's
own CLI unchanged::

    python -m lowbit.run.lm_eval --model lowbit --model_args pretrained=out/demo/lowbit --tasks lowbit_wikitext2

From Python: ``import lowbit.run.lm_eval`` and then ``lm_eval.simple_evaluate(model="lowbit", ...)``.
``lowbit eval tasks`` is the same with lowbit's options.

:class:`LowbitLM` is lm-eval's ``hf`` model class (:class:`lm_eval.models.huggingface.HFLM`) over
lowbit's runtime model, so log-likelihoods (``loglikelihood``, ``loglikelihood_rolling``) are
tokenized, windowed and scored exactly as ``hf`` scores a float model; ``generate_until`` goes through
:func:`lowbit.run.chat.generate_reply`, the generation call ``chat`` and ``serve`` use. Tasks shipped
with lowbit (``lowbit_wikitext2``: lm-eval's wikitext task over the WikiText-2 test split inside
lowbit, no download) live in :data:`BUILTIN_TASKS`, on the task path of both entry points.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from ..errors import CheckpointError, LowbitError

#: lm-eval task definitions that ship with lowbit
BUILTIN_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def load_for_eval(pretrained: str, dtype: str = "fp32", kernel: str | None = None, lm_head: str = "float",
                  trust_remote_code: bool = False):
    """(model, tokenizer, eos ids) of ``pretrained``: a checkpoint lowbit reads (lowbit, autoawq, gptq,
    xft, ...) on lowbit's runtime, or else a float model lowbit loads (HF directory, ``.gguf`` file,
    ``demo``), so the float source can be scored the same way."""
    from .chat import _eos_ids
    from .load import DTYPES, dtype_of, load_runtime

    if dtype not in DTYPES:
        raise LowbitError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}.")
    from ..exporting import detect_format

    try:
        detect_format(pretrained)
        quantized = True
    except CheckpointError:
        quantized = False
    if quantized:
        qm, model = load_runtime(pretrained, dtype, kernel, lm_head)
        return model, qm.tokenizer, _eos_ids(qm, qm.tokenizer)
    if kernel or lm_head != "float":
        raise LowbitError(f"{pretrained} is not a quantized checkpoint: kernel and lm_head do not apply.")
    from ..loading import load_generation_config, load_model, load_tokenizer, resolve

    src = resolve(pretrained)
    model = load_model(src, dtype_of(dtype), trust_remote_code)
    tokenizer = load_tokenizer(src, trust_remote_code)
    ids: list[int] = []
    gc = load_generation_config(src)
    for v in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return model, tokenizer, ids


@register_model("lowbit")
class LowbitLM(HFLM):
    """lm-eval's ``hf`` model over lowbit's runtime.

    :param pretrained: any checkpoint lowbit reads, or a float model (see :func:`load_for_eval`).
    :param dtype: activation dtype (``fp32`` default, as ``lowbit eval ppl``; ``bf16`` is faster).
    :param kernel: force one kernel (see ``lowbit kernels``); ``lm_head``: ``float``, ``int8`` or ``int4``.
    Other keyword arguments (``batch_size``, ``max_length``, ``add_bos_token``, ...) are ``hf``'s.
    """

    def __init__(self, pretrained: str, dtype: str = "fp32", kernel: str | None = None, lm_head: str = "float",
                 trust_remote_code: bool = False, **kwargs):
        if not isinstance(pretrained, str):
            raise LowbitError("the lowbit model takes pretrained=PATH (a checkpoint or float model), not a model object.")
        for name in ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file"):
            if kwargs.get(name):
                raise LowbitError(f"model_args {name} is an hf option that the lowbit model does not take.")
        kwargs.pop("device", None)  # lowbit's runtime runs on the CPU
        model, tokenizer, eos = load_for_eval(str(pretrained), str(dtype), kernel, lm_head, bool(trust_remote_code))
        self.lowbit_source = str(pretrained)
        self._eos_ids = eos
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request generated alone through :func:`lowbit.run.chat.generate_reply`: the same
        stop sequences (the task's ``until`` plus the end-of-text token), context truncation and
        output clean-up as ``hf``'s ``generate_until``."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from .chat import generate_reply

        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for req in tqdm(requests, desc="Running generate_until requests", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = kw.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise LowbitError(f"max_gen_toks {max_gen} leaves no room for a prompt in {self.max_length} tokens.")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            reply = generate_reply(self.model, self.tokenizer, ids, max_new_tokens=max_gen, temperature=temperature,
                                   top_p=float(kw.get("top_p") or 1.0), stop=until, eos=self._eos_ids)
            text = postprocess_generated_text(generation=reply.text, stop=until,
                                              think_end_token=self.think_end_token
                                              if isinstance(self.think_end_token, str) else None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def get_model_info(self) -> dict:
        return {"model_source": self.lowbit_source, "model_num_parameters": sum(
            p.numel() for p in self.model.parameters())}


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the ``lowbit`` model registered. lowbit's built-in tasks are
    put on the task path when no ``--include_path`` is given (lm-eval's CLI takes one directory)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if argv and not given and not {"-h", "--help"} & set(argv):
        argv += ["--include_path", str(BUILTIN_TASKS)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
