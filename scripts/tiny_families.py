"""Tiny random text-to-image pipelines of many diffusers families, written as ordinary pipeline folders.

Each is built from configs with the libraries' own classes, sized as diffusers' fast tests size them (a layer or
two, widths of 8 to 64), with tokenizers made offline from in-memory vocabularies (nothing is fetched), and saved
with `save_pretrained`: `resynth source add NAME FOLDER` then reads them as it reads a real download. They check
that resynth reaches each family (enrols, generates, attributes), not how well it tells real models apart.

    python scripts/tiny_families.py OUT [FAMILY ...]     # default: every family; prints "family folder"
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

WORDS = ("a an the of with in at and portrait photo man woman child old young smiling red blue green hat glasses "
         "beard hair long short park studio light dark painting face looking camera grey black white dress wall "
         "elderly teenager freckles curly scarf fisherman weathered bald moustache close up room outdoors soft").split()
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()/\n"


# ---- tokenizers, from vocabularies written here (never a hub) -------------------------------------------------

def clip_tokenizer(folder: Path):
    """A CLIPTokenizer from open_clip's shipped BPE (engine.zoo's tiny tokenizer), saved under `folder`."""
    from transformers import CLIPTokenizer

    from engine.zoo import write_clip_tokenizer

    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def t5_tokenizer():
    """A unigram T5 tokenizer over WORDS and single characters (what T5Tokenizer builds from a piece list)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in WORDS] + [(char, -5.0) for char in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _metaspace_vocab(specials: list[str]) -> dict[str, int]:
    tokens = specials + ["\u2581"] + [c for c in LETTERS if c != "\n"] + ["\n"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = _metaspace_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"])
    return GemmaTokenizer(vocab=vocab, merges=[])


def llama_tokenizer():
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(vocab=_metaspace_vocab(["<unk>", "<s>", "</s>"]), merges=[])
    tokenizer.pad_token = "</s>"
    return tokenizer


def byte_bpe_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level vocabulary (GPT-2's 256 byte symbols) with `specials` after it: every text tokenizes."""
    from open_clip.tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + specials
    return {token: i for i, token in enumerate(tokens)}


def qwen2_tokenizer():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(vocab=byte_bpe_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), merges=[])


def glm_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast, as CogView4's GLM tokenizer is saved (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = byte_bpe_vocab(["<|endoftext|>", "[gMASK]", "<sop>"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # GLM-4 prefixes every text with these two, so an empty negative prompt still has tokens
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def bert_tokenizer():
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS)
    tokens += [c for c in LETTERS.lower() if c.strip()] + ["##" + c for c in LETTERS.lower() if c.strip()]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})


# ---- text encoders -----------------------------------------------------------------------------------------------

def clip_config(vocab: int, hidden: int = 32, projection: int = 32, positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, projection_dim=projection, max_position_embeddings=positions,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="gelu")


def t5_encoder(vocab: int, width: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    settings = dict(vocab_size=vocab, d_model=width, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(UMT5Config(**settings)) if umt5 else T5EncoderModel(T5Config(**settings))


def flow_scheduler(**extra):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**extra)


def small_vae(blocks: int = 2, latent: int = 4, width: int = 8, **extra):
    """An AutoencoderKL with `blocks` levels (image side = latent side x 2**(blocks - 1))."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[width] * blocks, in_channels=3, out_channels=3, latent_channels=latent,
                         down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                         layers_per_block=1, norm_num_groups=1, sample_size=32, **extra)


# ---- families ----------------------------------------------------------------------------------------------------

def sd3(folder: Path):
    import diffusers as d
    from transformers import CLIPTextModelWithProjection

    tok = clip_tokenizer(folder / "_clip_vocab")
    t5 = t5_tokenizer()
    return d.StableDiffusion3Pipeline(
        transformer=d.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                            pos_embed_max_size=32),
        text_encoder=CLIPTextModelWithProjection(clip_config(len(tok))), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(len(tok))), tokenizer_2=tok,
        text_encoder_3=t5_encoder(len(t5)), tokenizer_3=t5,
        vae=small_vae(2, 4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5035),
        scheduler=flow_scheduler(shift=3.0))


def flux(folder: Path):
    import diffusers as d
    from transformers import CLIPTextModel

    tok = clip_tokenizer(folder / "_clip_vocab")
    t5 = t5_tokenizer()
    return d.FluxPipeline(
        transformer=d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True),
        text_encoder=CLIPTextModel(clip_config(len(tok))), tokenizer=tok,
        text_encoder_2=t5_encoder(len(t5)), tokenizer_2=t5,
        vae=small_vae(2, 4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5035),
        scheduler=flow_scheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256))


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=32, in_channels=4, cross_attention_dim=16,
                                    out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    norm_elementwise_affine=False, norm_eps=1e-6)


def pixart_alpha(folder: Path):
    import diffusers as d

    t5 = t5_tokenizer()
    return d.PixArtAlphaPipeline(transformer=_pixart_transformer(), vae=small_vae(4, 4),
                                 scheduler=d.DPMSolverMultistepScheduler(), text_encoder=t5_encoder(len(t5)),
                                 tokenizer=t5)


def pixart_sigma(folder: Path):
    import diffusers as d

    t5 = t5_tokenizer()
    return d.PixArtSigmaPipeline(transformer=_pixart_transformer(), vae=small_vae(4, 4), scheduler=d.DDIMScheduler(),
                                 text_encoder=t5_encoder(len(t5)), tokenizer=t5)


def sana(folder: Path):
    import diffusers as d
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    blocks = 6  # a 32x compression, as Sana's DC-AE: the default 512 px is 16x16 latents
    vae = d.AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                          encoder_block_types=("ResBlock",) * blocks, decoder_block_types=("ResBlock",) * blocks,
                          encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
                          encoder_qkv_multiscales=((),) * blocks, decoder_qkv_multiscales=((),) * blocks,
                          encoder_layers_per_block=(1,) * blocks, decoder_layers_per_block=(1,) * blocks,
                          downsample_block_type="conv", upsample_block_type="interpolate",
                          decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    text = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
                                    num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok),
                                    pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation="eager"))
    return d.SanaPipeline(
        transformer=d.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                             num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                             sample_size=16),
        vae=vae, scheduler=flow_scheduler(shift=3.0), text_encoder=text, tokenizer=tok)


def lcm(folder: Path):
    import diffusers as d
    from transformers import CLIPTextModel

    tok = clip_tokenizer(folder / "_clip_vocab")
    unet = d.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                  norm_num_groups=2, attention_head_dim=4, time_cond_proj_dim=32)
    return d.LatentConsistencyModelPipeline(
        vae=small_vae(2, 4), text_encoder=CLIPTextModel(clip_config(len(tok))), tokenizer=tok, unet=unet,
        scheduler=d.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def aura_flow(folder: Path):
    import diffusers as d

    t5 = t5_tokenizer()
    return d.AuraFlowPipeline(
        transformer=d.AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                                 num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                 caption_projection_dim=32, joint_attention_dim=32, out_channels=4,
                                                 pos_embed_max_size=64),
        text_encoder=t5_encoder(len(t5), umt5=True), tokenizer=t5, vae=small_vae(2, 4), scheduler=flow_scheduler())


def lumina2(folder: Path):
    import diffusers as d
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    text = Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                    num_hidden_layers=2, num_key_value_heads=2, sliding_window=2, vocab_size=len(tok),
                                    pad_token_id=0, bos_token_id=2, eos_token_id=1))
    return d.Lumina2Pipeline(
        transformer=d.Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=8,
                                                num_layers=2, num_attention_heads=1, num_kv_heads=1, multiple_of=16,
                                                ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
                                                axes_dim_rope=[4, 2, 2], cap_feat_dim=8),
        # Lumina2Pipeline assumes an 8x VAE (it does not read the VAE's config): four levels
        vae=small_vae(4, 4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5035), scheduler=flow_scheduler(), text_encoder=text, tokenizer=tok)


def hunyuandit(folder: Path):
    import diffusers as d
    from transformers import BertConfig, BertModel

    bert = bert_tokenizer()
    t5 = t5_tokenizer()
    return d.HunyuanDiTPipeline(
        transformer=d.HunyuanDiT2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=3, in_channels=4, cross_attention_dim=32,
                                        cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
                                        activation_fn="gelu-approximate"),
        vae=small_vae(4, 4), scheduler=d.DDPMScheduler(),
        text_encoder=BertModel(BertConfig(vocab_size=len(bert), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=37)), tokenizer=bert,
        text_encoder_2=t5_encoder(len(t5)), tokenizer_2=t5, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def cogview3(folder: Path):
    import diffusers as d

    t5 = t5_tokenizer()
    return d.CogView3PlusPipeline(
        transformer=d.CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                                     num_attention_heads=2, out_channels=4, text_embed_dim=32,
                                                     time_embed_dim=8, condition_dim=2, pos_embed_max_size=16,
                                                     sample_size=16),
        vae=small_vae(2, 4), scheduler=d.CogVideoXDDIMScheduler(), text_encoder=t5_encoder(len(t5)), tokenizer=t5)


def cogview4(folder: Path):
    import diffusers as d
    from transformers import GlmConfig, GlmModel

    tok = glm_tokenizer()
    text = GlmModel(GlmConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                              head_dim=8, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    return d.CogView4Pipeline(
        transformer=d.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                                 num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                                 time_embed_dim=8, condition_dim=4),
        vae=small_vae(2, 4), text_encoder=text, tokenizer=tok,
        scheduler=flow_scheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
                                 time_shift_type="linear"))


def deepfloyd_if(folder: Path):
    import diffusers as d

    t5 = t5_tokenizer()
    unet = d.UNet2DConditionModel(sample_size=16, layers_per_block=1, block_out_channels=[16, 32],
                                  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3,
                                  out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                                  addition_embed_type="text", addition_embed_type_num_heads=2,
                                  cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
                                  act_fn="gelu", norm_num_groups=8)
    scheduler = d.DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                                sample_max_value=1.0, variance_type="learned_range")
    return d.IFPipeline(tokenizer=t5, text_encoder=t5_encoder(len(t5)), unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def qwenimage(folder: Path):
    import diffusers as d
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen2_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok) + 8,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok) + 8, vision_start_token_id=len(tok), vision_end_token_id=len(tok) + 1,
        vision_token_id=len(tok) + 2, image_token_id=len(tok) + 3, video_token_id=len(tok) + 4)
    z_dim = 4
    vae = d.AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return d.QwenImagePipeline(
        transformer=d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                                  guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        vae=vae, scheduler=flow_scheduler(), text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tok)


def hidream(folder: Path):
    import diffusers as d
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    tok = clip_tokenizer(folder / "_clip_vocab")
    t5 = t5_tokenizer()
    llama = llama_tokenizer()
    text4 = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama), hidden_size=16, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=2, bos_token_id=1, eos_token_id=2))
    return d.HiDreamImagePipeline(
        transformer=d.HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                     num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                     caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
                                                     num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                     max_resolution=(32, 32), llama_layers=(0, 1)).eval(),
        vae=small_vae(2, 4, scaling_factor=0.3611, shift_factor=0.1159), scheduler=flow_scheduler(),
        text_encoder=CLIPTextModelWithProjection(clip_config(len(tok), positions=128)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(len(tok), positions=128)), tokenizer_2=tok,
        text_encoder_3=t5_encoder(len(t5)), tokenizer_3=t5, text_encoder_4=text4, tokenizer_4=llama)


def kandinsky22(folder: Path):
    """Kandinsky 2.2 as its combined pipeline (prior + decoder): the decoder alone takes image embeddings."""
    import diffusers as d
    from torch import nn
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    tok = clip_tokenizer(folder / "_clip_vocab")
    prior = d.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)
    prior.clip_std = nn.Parameter(torch.ones(prior.clip_std.shape))  # zeros would make every embedding 0
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, image_size=32, projection_dim=32,
                                                            intermediate_size=37, num_attention_heads=4,
                                                            num_hidden_layers=2, patch_size=8))
    unet = d.UNet2DConditionModel(in_channels=4, out_channels=8, addition_embed_type="image",
                                  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                  up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64),
                                  layers_per_block=1, encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
                                  cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                                  class_embed_type=None)
    movq = d.VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                     in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                     num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                     vq_embed_dim=4)
    return d.KandinskyV22CombinedPipeline(
        unet=unet, movq=movq,
        scheduler=d.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1),
        prior_prior=prior, prior_image_encoder=vision,
        prior_text_encoder=CLIPTextModelWithProjection(clip_config(len(tok))), prior_tokenizer=tok,
        prior_scheduler=d.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                          num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0),
        prior_image_processor=CLIPImageProcessor(crop_size=32, size=32))


# a chat template as Qwen's tokenizers carry one (Flux.2 Klein formats its prompt with it)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def flux2_klein(folder: Path):
    """Flux.2 [klein]: text-to-image with optional reference images, a Qwen3 text encoder read at layers 9, 18, 27."""
    import diffusers as d
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen2_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    text = Qwen3ForCausalLM(Qwen3Config(intermediate_size=16, hidden_size=16, num_hidden_layers=28,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                        vocab_size=len(tok), max_position_embeddings=512))
    vae = d.AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3,
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               block_out_channels=(4, 4), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                               use_quant_conv=False, use_post_quant_conv=False)
    return d.Flux2KleinPipeline(
        transformer=d.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                              timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                              guidance_embeds=False),
        text_encoder=text, tokenizer=tok, vae=vae, scheduler=flow_scheduler())


def stable_cascade(folder: Path):
    """Stable Cascade as its combined pipeline (prior, decoder, Paella VQ-GAN); the stages alone are refused."""
    import diffusers as d
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextModelWithProjection

    tok = clip_tokenizer(folder / "_clip_vocab")
    prior = d.StableCascadeUNet(conditioning_dim=128, block_out_channels=(128, 128), num_attention_heads=(2, 2),
                                down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                                clip_image_in_channels=768, switch_level=(False,), clip_text_in_channels=32,
                                clip_text_pooled_in_channels=32)
    decoder = d.StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=128, block_out_channels=(16, 32, 64, 128),
        num_attention_heads=(-1, -1, 1, 2), down_num_layers_per_block=(1, 1, 1, 1),
        up_num_layers_per_block=(1, 1, 1, 1), down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(3, 3, 2, 2),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),) * 2
        + (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        switch_level=None, clip_text_pooled_in_channels=32, dropout=(0.0,) * 4)
    return d.StableCascadeCombinedPipeline(
        tokenizer=tok, text_encoder=CLIPTextModelWithProjection(clip_config(len(tok))), decoder=decoder.eval(),
        scheduler=d.DDPMWuerstchenScheduler(), vqgan=PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2).eval(),
        prior_text_encoder=CLIPTextModelWithProjection(clip_config(len(tok))), prior_tokenizer=tok,
        prior_prior=prior.eval(), prior_scheduler=d.DDPMWuerstchenScheduler(), prior_feature_extractor=None,
        prior_image_encoder=None)


FAMILIES: dict[str, Callable[[Path], object]] = {
    "sd3": sd3, "flux": flux, "pixart-alpha": pixart_alpha, "pixart-sigma": pixart_sigma, "sana": sana, "lcm": lcm,
    "aura-flow": aura_flow, "lumina2": lumina2, "hunyuandit": hunyuandit, "cogview3": cogview3, "cogview4": cogview4,
    "deepfloyd-if": deepfloyd_if, "qwenimage": qwenimage, "hidream": hidream,
    "kandinsky22": kandinsky22, "flux2-klein": flux2_klein, "stable-cascade": stable_cascade,
}


def write_family(family: str, folder: Path, seed: int = 0) -> Path:
    """Build one family's tiny pipeline with weights seeded by `seed` and save it as a pipeline folder."""
    import shutil

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pipe = FAMILIES[family](folder)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_clip_vocab", ignore_errors=True)
    return folder


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in sys.argv[2:] or list(FAMILIES):
        try:
            print(name, write_family(name, out / name), flush=True)
        except Exception as exc:  # a family this diffusers cannot build: say which, go on with the others
            print(name, "FAILED:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", flush=True)
