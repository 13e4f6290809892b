"""An Ollama ``Modelfile`` for an exported GGUF: finpipe's chat template (ChatML), system prompt, stop tokens and
greedy decoding, so ``ollama create`` gives a model that is prompted exactly as it was trained."""

from __future__ import annotations

from finpipe.instructions.samples import SYSTEM_PROMPT
from finpipe.models.chat_template import IM_END, IM_START

# ChatML as finpipe trains it: "<|im_start|>{role}\n{content}<|im_end|>\n" per turn, then the generation prompt
TEMPLATE = (
    "{{- if .System }}" + IM_START + "system\n{{ .System }}" + IM_END + "\n{{ end }}"
    "{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
    + IM_START + "assistant\n"
)


def modelfile(gguf_name: str, system_prompt: str = SYSTEM_PROMPT, num_ctx: int = 2048) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same folder)."""
    if '"""' in system_prompt:
        raise ValueError('the system prompt cannot contain """ (it ends a Modelfile string)')
    return "\n".join([
        "# finpipe: `ollama create finpipe -f Modelfile`, then `ollama run finpipe` (questions need finpipe's",
        "# market-data context block to be grounded: see README.md in this folder)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{TEMPLATE}"""',
        f'SYSTEM """{system_prompt}"""',
        f'PARAMETER stop "{IM_END}"',
        f'PARAMETER stop "{IM_START}"',
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {num_ctx}",
        "",
    ])
