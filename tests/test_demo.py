"""The README's `make demo` runs the whole pipeline; here it runs with fewer steps into a temp folder."""

from longlora_hub.demo import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    main(["--output", str(tmp_path / "demo"), "--steps", "2"])
    printed = capsys.readouterr().out
    assert "converted to LlamaLongLoRAForCausalLM: context 1024, RoPE linear x4" in printed
    assert "step 2: loss" in printed
    assert (tmp_path / "demo" / "extended" / "trained" / "s2_attention.py").is_file()
