"""The README's `make demo` runs the whole pipeline; here it runs with fewer steps into a temp folder."""

from longlora_hub.demo import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["--output", str(out), "--extend-steps", "3", "--longqa-steps", "2", "--trials", "2"])
    printed = capsys.readouterr().out
    assert "the shipped tiny base: 3.4M parameters" in printed
    assert "converted to LlamaLongLoRA: context 1024, RoPE linear x4" in printed
    assert "loss at 1024 tokens:" in printed
    for when in ("before extension", "with PI alone", "after extension"):
        assert f"passkey {when}: 256: " in printed and f"perplexity {when}: 256: " in printed
    for folder in ("converted", "extend", "extended", "longqa", "final"):
        assert (out / folder).is_dir(), folder
    assert (out / "final" / "s2_attention.py").is_file()
    assert "generation on a" in printed
