"""Tiny random FLUX.2 klein pipelines, built locally from diffusers' and transformers' own classes
(Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM), for tests and tries: nothing can
be downloaded from a model hub. The folder has a real klein diffusers folder's layout
(transformer, text_encoder, tokenizer, vae, scheduler), so it loads as FLUX.2-klein-base-4B does."""
import torch

from ..zimage.tiny import QWEN3_VOCAB, write_tokenizer  # klein reads prompts with Qwen3, as Z-Image

PRESETS = {
    # inner dim = heads x head_dim = heads x sum(axes_dims_rope) (four rope axes, as klein's);
    # Qwen3 needs 27 layers: klein stacks its hidden states 9, 18 and 27 (Flux2KleinPipeline)
    "tiny": dict(heads=2, head_dim=16, axes_dims=(4, 4, 4, 4), layers=1, single_layers=2, text_dim=16,
                 text_layers=27, vae_channels=(16, 32), latent_channels=8),
}


def tiny_vae(shape):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(latent_channels=shape["latent_channels"], block_out_channels=shape["vae_channels"],
                             layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * len(shape["vae_channels"]),
                             up_block_types=("UpDecoderBlock2D",) * len(shape["vae_channels"]))
    # running statistics that are not the identity, so that the normalisation is exercised
    vae.bn.running_mean.uniform_(-0.2, 0.2)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def build_tiny(folder, preset="tiny", seed=0):
    """Write a random FLUX.2 klein diffusers folder; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import os

    shape = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=shape["text_dim"], intermediate_size=shape["text_dim"] * 2,
        num_hidden_layers=shape["text_layers"], num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id))
    transformer = Flux2Transformer2DModel(
        in_channels=shape["latent_channels"] * 4, num_layers=shape["layers"], num_single_layers=shape["single_layers"],
        attention_head_dim=shape["head_dim"], num_attention_heads=shape["heads"],
        joint_attention_dim=3 * shape["text_dim"], timestep_guidance_channels=32,
        axes_dims_rope=shape["axes_dims"], guidance_embeds=False)  # klein has no guidance embedding
    # klein's scheduler_config.json: the shift is computed per image size (the pipeline's mu)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipeline = Flux2KleinPipeline(scheduler=scheduler, vae=tiny_vae(shape), text_encoder=text_encoder,
                                  tokenizer=tokenizer, transformer=transformer, is_distilled=False)
    pipeline.save_pretrained(folder)
    return folder
