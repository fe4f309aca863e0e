"""Under a pretrained backbone (``model.backbone.kind=hf``) the tokenizer is the model's: the errors name a
fix that works there, and ``--print-config`` leaves out the settings that do not apply."""

from mtp_lightning.cli import main


def test_missing_model_tokenizer_names_a_tokenizer_with_the_models_ids(tmp_path, fit_args, capsys):
    model = tmp_path / "model"
    model.mkdir()  # a model folder without tokenizer.json: the tokenizer fails before any model is loaded
    assert main(fit_args(model, tmp_path / "runs", "hint")) == 2
    assert capsys.readouterr().err == (
        f"error: tokenizer file '{model / 'tokenizer.json'}' does not exist; model '{model}' needs its own "
        f"tokenizer: set tokenizer.kind=file and tokenizer.path to a tokenizer.json with the model's ids\n")
    assert not (tmp_path / "runs" / "hint").exists()


def test_missing_tokenizer_file_suggests_the_models_own(tmp_path, fit_args, capsys):
    model, missing = tmp_path / "model", tmp_path / "tok.json"
    model.mkdir()
    assert main(fit_args(model, tmp_path / "runs", "hint", "tokenizer.kind=file", f"tokenizer.path={missing}")) == 2
    assert capsys.readouterr().err == (
        f"error: tokenizer file '{missing}' does not exist; set tokenizer.path to a tokenizer.json with model "
        f"'{model}''s ids, or leave tokenizer.kind=bpe to use the model's own tokenizer\n")


def test_print_config_under_the_models_own_tokenizer(capsys):
    assert main(["fit", "--print-config", "model.backbone.kind=hf", "model.backbone.name_or_path=org/lm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "# tokenizer: model 'org/lm''s own (tokenizer.kind=bpe under model.backbone.kind=hf)",
        "# not shown, as they do not apply: model.gpt.* and tokenizer.* (the sizes and the vocabulary come "
        "from the model)",
        "run:"]
    assert "tokenizer:" not in lines[2:] and "  gpt:" not in lines and "  backbone:" in lines
    assert not any("vocab_size" in line for line in lines)


def test_print_config_under_an_explicit_tokenizer(capsys):
    assert main(["fit", "--print-config", "model.backbone.kind=hf", "model.backbone.name_or_path=org/lm",
                 "tokenizer.kind=file", "tokenizer.path=/t/tokenizer.json"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:2] == [
        "# tokenizer: /t/tokenizer.json (tokenizer.kind=file)",
        "# not shown, as they do not apply: model.gpt.* (the sizes and the vocabulary come from the model) "
        "and tokenizer.vocab_size, tokenizer.train_bytes (a trained BPE's)"]
    assert "tokenizer:\n  kind: file\n  path: /t/tokenizer.json\n" in out and "  gpt:" not in lines


def test_print_config_of_the_projects_own_model_shows_everything(capsys):
    assert main(["fit", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("#") and "  gpt:" in out.splitlines() and "  vocab_size: 4096" in out
