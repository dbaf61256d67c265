"""The Train form's values on their way to a run, through the real section built in a Gradio Blocks: an emptied
number box is named in the message (not a TypeError), and the kohya options reach the TrainConfig."""

from __future__ import annotations

import gradio as gr
import pytest

from app.ui.train_section import EMBEDDING, LORA, TrainSection


def build(services, spec) -> TrainSection:
    with gr.Blocks():
        txt2img = {
            "prompt": gr.Textbox(),
            "negative_prompt": gr.Textbox(),
            "steps": gr.Number(),
            "sampler": gr.Textbox(),
            "cfg_scale": gr.Number(),
            "seed": gr.Number(),
            "width": gr.Number(),
            "height": gr.Number(),
        }
        return TrainSection(services, spec, txt2img)


def values(section: TrainSection, **changes) -> list:
    given = {key: section.fields[key].value for key in section.order}
    given.update(changes)
    return [given[key] for key in section.order] + ["", "", 20, "Euler a", 7, -1, 64, 64]


@pytest.mark.parametrize(("field", "label"), [("batch_size", "Batch size"), ("steps", "Max steps")])
def test_an_emptied_number_box_is_named(services, field, label):
    section = build(services, EMBEDDING)
    message = section.on_train(*values(section, name="anything", **{field: None}))
    assert "id='train_error'" in message and f"&#x27;{label}&#x27; is empty: enter a whole number." in message


def test_the_form_s_kohya_options_reach_the_run_s_settings(services):
    section = build(services, LORA)
    cfg = section.config(
        values(
            section,
            name="zqform",
            enable_bucket=True,
            min_snr_gamma=5,
            noise_offset=None,  # emptied: off
            multires_noise_iterations=6,
            multires_noise_discount=None,  # emptied: kohya's default
            ip_noise_gamma=0.1,
            keep_tokens=2,
            lr_scheduler="cosine",
            lr_warmup_steps=10,
            text_encoder_lr="5e-5",
            save_precision="bf16",
            gradient_checkpointing="off",
            reg_data_dir="/data/reg",
            optimizer_type="Prodigy",
            optimizer_args="d_coef=2",
            prior_loss_weight=None,  # emptied: the default weight
            loss_type="huber",
            huber_schedule="exponential",
            huber_c=None,  # emptied: kohya's default
            debiased_estimation_loss=True,
            min_timestep=100,
            max_timestep=900,
            validation_split=0.2,
            validate_every_n_steps=50,
            validation_seed=None,  # empty: the run's seed
        )
    )
    assert (cfg.validation_split, cfg.validate_every_n_steps, cfg.validation_seed) == (0.2, 50, None)
    assert (cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale) == ("huber", "exponential", 0.1, 1.0)
    assert (cfg.debiased_estimation_loss, cfg.min_timestep, cfg.max_timestep) == (True, 100, 900)
    assert (cfg.enable_bucket, cfg.min_snr_gamma, cfg.noise_offset, cfg.keep_tokens) == (True, 5.0, 0.0, 2)
    assert (cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.ip_noise_gamma) == (6, 0.3, 0.1)
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.text_encoder_lr) == ("cosine", 10, "5e-5")
    assert (cfg.save_precision, cfg.gradient_checkpointing) == ("bf16", "off")
    assert (cfg.reg_data_dir, cfg.prior_loss_weight) == ("/data/reg", 1.0)
    assert (cfg.optimizer_type, cfg.optimizer_args) == ("Prodigy", "d_coef=2")
    given = section.config(values(section, name="zqform", prior_loss_weight=0.5, validation_seed=7.0))
    assert given.validation_seed == 7 and isinstance(given.validation_seed, int)
    assert (given.reg_data_dir, given.prior_loss_weight) == ("", 0.5)
    assert (given.optimizer_type, given.optimizer_args) == ("AdamW", "")  # the defaults


def test_the_embedding_form_has_no_regularization_folder(services):
    section = build(services, EMBEDDING)  # regularization prompts never hold an embedding
    assert "reg_data_dir" not in section.fields and "prior_loss_weight" not in section.fields
    assert section.config(values(section, name="zqform")).reg_data_dir == ""


def test_the_lora_form_s_network_type_and_conv_dim_reach_the_file(services, tmp_path):
    """The LoRA tab's own fields (not TrainConfig's) go to train_lora: a short real run from the form."""
    from app.lora.files import LokrLayer, read_lora_file
    from tests.test_lora_training import clean
    from tests.test_training import make_dataset

    clean(services, "zqformlokr")
    section = build(services, LORA)
    form = dict(name="zqformlokr", data_root=str(make_dataset(tmp_path / "stars")), steps=2, create_image_every=0)
    form.update(save_every=0, training_width=64, training_height=64, network_type="lokr", rank=2, conv_dim=2)
    message = section.on_train(*values(section, **form))
    assert "id='train_started'" in message, message
    job = next(j for j in [services.jobs.current, *services.jobs.pending(), services.jobs.last] if j is not None)
    result = job.wait()
    assert result.error is None
    lora = read_lora_file(result.path)
    assert all(isinstance(layer, LokrLayer) for layer in lora.layers.values())
    assert any("resnets" in name for name in lora.layers)
