"""`longlora-hub generate`: the prompt (chat and [INST] templates, as LongQA training writes them), the streamed
answer against `model.generate` on the same prompt (greedy and seeded sampling), adapters against PEFT and the merged
model, text / Markdown / PDF material, and every error it promises, all on the shipped tiny pretrained base."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from longlora_hub.cli import main
from longlora_hub.convert import convert_checkpoint
from longlora_hub.generate import BUILTIN_MODEL, build_prompt, check_context, generate, read_material
from longlora_hub.longqa.templates import render_instruction
from longlora_hub.testing import tiny_llama_config
from longlora_hub.training import PRETRAINED_TINY

from .test_longqa import _pdf_with_text

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # the shipped base's max_position_embeddings
DOCUMENT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The pass key is 4821. Remember it. 4821 is the pass key."
)
QUESTION = "What is the pass key?"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PRETRAINED_TINY)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(PRETRAINED_TINY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """The shipped base with a chat template on its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(PRETRAINED_TINY, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("material") / "notes.txt"
    path.write_text(DOCUMENT + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A LongLoRA adapter (LoRA + embeddings + norms) on the shipped base, with weights that change its answers."""
    from peft import get_peft_model

    from longlora_hub.trainable import lora_config

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(PRETRAINED_TINY), lora_config("longlora"))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5, generator=generator)
    folder = tmp_path_factory.mktemp("run") / "longqa"
    peft_model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(PRETRAINED_TINY)
    return folder


def reference(model, input_ids: list[int], max_new_tokens: int = NEW_TOKENS, **sampling) -> list[int]:
    """What `model.generate` itself produces from the same token ids (greedy unless told to sample), with the KV
    cache as the command uses it (the shipped base saves use_cache=False from its training)."""
    ids = torch.tensor([input_ids])
    settings = sampling or {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=2,
            use_cache=True,
            **settings,
        )
    return output[0, len(input_ids) :].tolist()


def run_generate(*args: str):
    """The command, in float32 like the reference models (the shipped base is stored in bfloat16, which `--dtype
    auto` would keep)."""
    dtype = [] if "--dtype" in args else ["--dtype", "float32"]
    return CliRunner().invoke(main, ["generate", *map(str, args), *dtype])


def assert_fails(result, *fragments: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# ----------------------------------------------------------------------------------------------------- the prompt


def test_inst_prompt_is_the_longqa_training_prompt(tokenizer):
    from datasets import Dataset
    from longlora_hub.data import to_prompt_completion

    assert not tokenizer.chat_template
    prompt = build_prompt(tokenizer, DOCUMENT, QUESTION)
    instruction = render_instruction([DOCUMENT], QUESTION)
    assert prompt.template == "inst"
    assert prompt.text == f"[INST]{instruction}[/INST]"
    assert prompt.text.startswith("[INST]Below is a paper. Memorize the paper and answer my question after the paper.")
    assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]
    # the longqa stage turns instruction/output rows into exactly this prompt
    row = to_prompt_completion(Dataset.from_list([{"instruction": instruction, "output": "4821"}]))[0]
    assert row["prompt"] == prompt.text
    # braces in a document stay as written: the question is not substituted into it
    assert "{question}" in build_prompt(tokenizer, "A {question} in the text.", QUESTION).text


def test_chat_prompt_is_the_user_message_with_the_generation_prompt(chat_dir):
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    prompt = build_prompt(tokenizer, DOCUMENT, QUESTION)
    messages = [{"role": "user", "content": render_instruction([DOCUMENT], QUESTION)}]
    assert prompt.template == "chat"
    assert prompt.text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.text.startswith("<s><|user|>\nBelow is a paper.") and prompt.text.endswith("<|assistant|>\n")
    # the template's own BOS, and no second one: what apply_chat_template tokenizes
    assert prompt.input_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert prompt.input_ids.count(tokenizer.bos_token_id) == 1
    assert build_prompt(tokenizer, DOCUMENT, QUESTION, template="inst").text.startswith("[INST]Below is a paper.")


def test_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="no chat template; use --template inst"):
        build_prompt(tokenizer, DOCUMENT, QUESTION, template="chat")
    with pytest.raises(ValueError, match="The question is empty"):
        build_prompt(tokenizer, DOCUMENT, "  ")
    with pytest.raises(ValueError, match="--template must be one of auto, chat, inst"):
        build_prompt(tokenizer, DOCUMENT, QUESTION, template="alpaca")


# ----------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("template", ["inst", "chat"])
def test_cli_streams_what_model_generate_gives(template, model, tokenizer, chat_dir, material, monkeypatch):
    pieces: list[str] = []
    finalize = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        pieces.append(text)
        finalize(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    name = BUILTIN_MODEL if template == "inst" else chat_dir
    used = tokenizer if template == "inst" else AutoTokenizer.from_pretrained(chat_dir)
    prompt = build_prompt(used, DOCUMENT, QUESTION)
    assert prompt.template == template  # auto picks the chat template exactly when the tokenizer has one
    expected = reference(model, prompt.input_ids)

    result = run_generate(name, "--material", material, "--question", QUESTION, "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"  # the answer alone
    # streamed piece by piece, the prompt left out; the streamer ends the answer with a newline
    assert len(pieces) > 2 and "".join(pieces) + "\n" == result.stdout
    assert f"a {len(prompt.input_ids)}-token prompt ({template} template)" in result.stderr
    assert "greedy" in result.stderr and "context 256" in result.stderr


def test_quiet_before_the_command_and_the_question_after_it(model, tokenizer, material):
    """`-q` before `generate` is the group's --quiet, after it generate's --question: both in one command line, and
    quiet leaves the answer alone on stdout with nothing on stderr from this package."""
    prompt = build_prompt(tokenizer, DOCUMENT, QUESTION)
    answer = tokenizer.decode(reference(model, prompt.input_ids, 4), skip_special_tokens=True) + "\n"
    args = ["generate", BUILTIN_MODEL, "-m", str(material), "-q", QUESTION, "--max-new-tokens", "4"]
    loud = CliRunner().invoke(main, [*args, "--dtype", "float32"])
    quiet = CliRunner().invoke(main, ["-q", *args, "--dtype", "float32"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert loud.stdout == quiet.stdout == answer
    assert f"[longlora-hub] {BUILTIN_MODEL}: a {len(prompt.input_ids)}-token prompt" in loud.stderr
    assert "[longlora-hub]" not in quiet.stderr and "-token prompt" not in quiet.output


def test_greedy_even_when_the_checkpoint_says_sample(model, tokenizer):
    ids = build_prompt(tokenizer, DOCUMENT, QUESTION).input_ids
    expected = reference(model, ids)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)  # what Llama-2-chat ships
    try:
        answer = generate(model, tokenizer, ids, max_new_tokens=NEW_TOKENS)
    finally:
        model.generation_config = saved
    assert answer.token_ids == expected
    assert answer.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_is_temperature_and_top_p_and_seeded(model, tokenizer, material):
    ids = build_prompt(tokenizer, DOCUMENT, QUESTION).input_ids
    torch.manual_seed(0)
    expected = reference(model, ids, do_sample=True, temperature=1.5, top_p=0.95, top_k=0)
    first = generate(model, tokenizer, ids, max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=0.95, seed=0)
    assert first.token_ids == expected
    assert first.token_ids != reference(model, ids)  # it did sample

    options = ["--max-new-tokens", NEW_TOKENS, "--temperature", "1.5", "--top-p", "0.95", "--seed", "0"]
    result = run_generate(BUILTIN_MODEL, "-m", material, "-q", QUESTION, *options)
    assert result.exit_code == 0, result.output
    assert result.stdout == first.text + "\n"
    assert "sampling at temperature 1.5" in result.stderr
    assert_fails(
        run_generate(BUILTIN_MODEL, "-m", material, "-q", QUESTION, "--top-p", "0.9"),
        "--top-p applies only when sampling",
        exit_code=2,
    )


def test_adapter_gives_what_peft_and_the_merged_model_give(adapter_dir, model, tokenizer, material):
    from peft import PeftModel

    ids = build_prompt(tokenizer, DOCUMENT, QUESTION).input_ids
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(PRETRAINED_TINY, dtype=torch.float32), adapter_dir
    ).eval()
    expected = reference(peft_model, ids)
    assert reference(peft_model.merge_and_unload(), ids) == expected
    assert expected != reference(model, ids)  # the adapter changes the answer

    text = tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    common = ["--material", material, "--question", QUESTION, "--max-new-tokens", NEW_TOKENS]
    with_option = run_generate(PRETRAINED_TINY, "--adapter", adapter_dir, *common)
    assert with_option.exit_code == 0, with_option.output
    assert with_option.stdout == text
    as_model = run_generate(adapter_dir, *common)  # the run folder alone: its base comes from adapter_config.json
    assert as_model.exit_code == 0, as_model.output
    assert as_model.stdout == text


def test_markdown_and_pdf_material(tmp_path, model, tokenizer):
    pytest.importorskip("pypdf")
    markdown = tmp_path / "paper.md"
    markdown.write_bytes(b"\xef\xbb\xbf# Notes\r\n\r\n- The pass key is **4821**.\r\n\r\n")  # BOM, Windows line ends
    assert read_material(markdown) == "# Notes\n\n- The pass key is **4821**."

    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(_pdf_with_text("The pass key is 4821. Remember it."))
    text = read_material(pdf)
    assert "The pass key is 4821. Remember it." in text
    expected = reference(model, build_prompt(tokenizer, text, QUESTION).input_ids)
    result = run_generate(BUILTIN_MODEL, "--material", pdf, "--question", QUESTION, "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


# ----------------------------------------------------------------------------------------------------- the context


def test_a_prompt_beyond_the_context_is_refused_before_the_model_loads(tmp_path, tokenizer, monkeypatch):
    import longlora_hub.evaluation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    long_document = tmp_path / "long.txt"
    long_document.write_text(" ".join([DOCUMENT] * 12), encoding="utf-8")
    tokens = len(build_prompt(tokenizer, read_material(long_document), QUESTION).input_ids)
    assert tokens > CONTEXT
    result = run_generate(BUILTIN_MODEL, "-m", long_document, "-q", QUESTION, "--max-new-tokens", 32)
    assert_fails(
        result,
        f"The prompt is {tokens} tokens and --max-new-tokens 32 allows 32 more: {tokens + 32} tokens, beyond the "
        f"256-token context of {PRETRAINED_TINY} (max_position_embeddings=256, unscaled RoPE)",
        f"Shorten the material by at least {tokens + 32 - CONTEXT} tokens (the prompt alone does not fit)",
        f"`longlora-hub convert {PRETRAINED_TINY} OUTPUT --context-length 1024`",
    )

    short = len(build_prompt(tokenizer, DOCUMENT, QUESTION).input_ids)
    result = run_generate(BUILTIN_MODEL, "-m", tmp_path / "short.md", "-q", QUESTION)
    assert_fails(result, "No file at")
    (tmp_path / "short.md").write_text(DOCUMENT, encoding="utf-8")
    result = run_generate(BUILTIN_MODEL, "-m", tmp_path / "short.md", "-q", QUESTION, "--max-new-tokens", 200)
    assert_fails(
        result,
        f"The prompt is {short} tokens and --max-new-tokens 200 allows 200 more",
        f"Lower --max-new-tokens to at most {CONTEXT - short}, shorten the material by {short + 200 - CONTEXT} tokens",
    )
    result = run_generate(BUILTIN_MODEL, "-m", tmp_path / "short.md", "-q", QUESTION)  # the default, 512
    assert_fails(result, f"Lower --max-new-tokens to at most {CONTEXT - short}, or use a model extended further")


def test_the_same_prompt_fits_once_the_model_is_extended(tmp_path, tokenizer):
    """What the error suggests works: `convert` (Position Interpolation) and a LlamaLongLoRA checkpoint, which needs
    no --trust-remote-code and generates with full attention in eval mode."""
    extended = convert_checkpoint(PRETRAINED_TINY, tmp_path / "tiny-1024", 1024)
    long_document = tmp_path / "long.txt"
    long_document.write_text(" ".join([DOCUMENT] * 12), encoding="utf-8")
    ids = build_prompt(tokenizer, read_material(long_document), QUESTION).input_ids
    long_model = AutoModelForCausalLM.from_pretrained(extended, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(long_model).__name__ == "LlamaLongLoRAForCausalLM"
    expected = reference(long_model, ids, 16)
    result = run_generate(extended, "-m", long_document, "-q", QUESTION, "--max-new-tokens", 16)
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert f"a {len(ids)}-token prompt" in result.stderr and "context 1024" in result.stderr


def test_check_context_cases():
    config = tiny_llama_config()  # 256 positions, unscaled RoPE
    check_context(config, 200, 56, "tiny")  # exactly the context
    with pytest.raises(
        ValueError, match=r"at most 56, shorten the material by 1 tokens, or use .* --context-length 512"
    ):
        check_context(config, 200, 57, "tiny")
    with pytest.raises(ValueError, match="Shorten the material and lower --max-new-tokens, to 256 tokens together"):
        check_context(config, 300, 512, "tiny")
    # dynamic NTK rescales beyond max_position_embeddings: no fixed limit
    check_context(tiny_llama_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), 300, 512, "tiny")


# ----------------------------------------------------------------------------------------------------- bad material


def test_material_errors(tmp_path, material, monkeypatch):
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "README").write_text(DOCUMENT)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("Line one\nCaf\xe9\n".encode("latin-1"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    (tmp_path / "blank.pdf").write_bytes(_pdf_with_text(""))
    (tmp_path / "folder.md").mkdir()
    cases = {
        "missing.txt": "No file at",
        "folder.md": "is a folder; --material takes one document file",
        "notes.docx": "is a .docx file; --material reads text (.txt), Markdown (.md) and PDF (.pdf) documents",
        "README": "is a file without a suffix",
        "empty.txt": "is empty (or only blank space)",
        "latin1.txt": "latin1.txt:2: not UTF-8 (byte 0xE9 at byte offset 12); save the document as UTF-8",
        "broken.pdf": "could not be read as a PDF",
        "blank.pdf": "holds no text pypdf can extract (a scanned PDF",
    }
    for name, message in cases.items():
        assert_fails(run_generate(BUILTIN_MODEL, "-m", tmp_path / name, "-q", QUESTION), message)
    assert_fails(run_generate(BUILTIN_MODEL, "-m", material, "-q", " "), "The question is empty")
    assert_fails(run_generate(BUILTIN_MODEL, "-m", material), "Missing option '--question'", exit_code=2)
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if the optional dependency were not installed
    assert_fails(run_generate(BUILTIN_MODEL, "-m", tmp_path / "blank.pdf", "-q", QUESTION), "longlora-hub[pdf]")


def test_model_errors(tmp_path, material, adapter_dir):
    assert_fails(run_generate(tmp_path / "nowhere", "-m", material, "-q", QUESTION), "neither a folder nor a")
    assert_fails(
        run_generate(PRETRAINED_TINY, "--adapter", tmp_path, "-m", material, "-q", QUESTION), "adapter_config.json"
    )
    assert_fails(
        run_generate(BUILTIN_MODEL, "-m", material, "-q", QUESTION, "--template", "chat"), "has no chat template"
    )
    assert_fails(run_generate(BUILTIN_MODEL, "-m", material, "-q", QUESTION, "--device", "gpu9"), "not a device name")


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from longlora_hub.cli import main\n"
        "for args in (['--help'], ['generate', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [name for name in ('torch', 'transformers', 'peft') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "generate  Answer a question about a long document" in result.stdout
    for option in ("--material", "--question", "--adapter", "--template", "--max-new-tokens", "--temperature"):
        assert option in result.stdout
