"""Provenance: every fixture file is built here, at test time (no binary files in the repository)."""
from __future__ import annotations

import datetime
import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.provenance import read_provenance

A1111 = ("portrait of an old man with a beard, oil painting\nsoft light\n"
         "Negative prompt: blurry, lowres\n"
         "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
         "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
         'Lora hashes: "detail: 0123abcd, style: 89ef4567", Version: v1.10.1')


def picture(size=(64, 64), seed=0) -> Image.Image:
    """A smooth, textured RGB image (watermark codecs need more than a flat colour)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 60 * np.sin(x / 17.0), 128 + 60 * np.cos(y / 23.0), 128 + 40 * np.sin((x + y) / 31.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def png(texts=(), size=(64, 64), itxt=(), ztxt=()) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in texts:
        info.add_text(k, v)
    for k, v in itxt:
        info.add_itxt(k, v)
    for k, v in ztxt:
        info.add_text(k, v, zip=True)
    buf = io.BytesIO()
    picture(size).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def jpeg(exif: bytes | None = None, app1: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    picture().save(buf, "JPEG", quality=90, **({"exif": b"Exif\x00\x00" + exif} if exif else {}))
    data = buf.getvalue()
    if app1 is not None:  # a raw APP1 segment right after SOI
        data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    return data


def png_chunk(ctype: bytes, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return struct.pack(">I", n) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def with_chunks(data: bytes, *chunks: bytes) -> bytes:
    """A PNG with extra chunks inserted right after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4
    return data[:ihdr_end] + b"".join(chunks) + data[ihdr_end:]


def tiff(ifd0: list, exif_ifd: list | None = None, big_endian: bool = False) -> bytes:
    """A minimal EXIF block: entries are (tag, type, count, payload bytes); payloads over 4 bytes
    go after the IFDs. An Exif IFD, when given, is pointed to from IFD0."""
    e = ">" if big_endian else "<"
    ifd0 = list(ifd0) + ([(0x8769, 4, 1, None)] if exif_ifd is not None else [])
    tables = [ifd0] + ([exif_ifd] if exif_ifd is not None else [])
    sizes = [2 + 12 * len(t) + 4 for t in tables]
    data_at = 8 + sum(sizes)
    heap = b""
    out = []
    offsets = [8, 8 + sizes[0]]
    for table in tables:
        raw = struct.pack(e + "H", len(table))
        for tag, typ, count, payload in table:
            if payload is None:  # the Exif IFD pointer
                value = struct.pack(e + "I", offsets[1])
            elif len(payload) <= 4:
                value = payload.ljust(4, b"\x00")
            else:
                value = struct.pack(e + "I", data_at + len(heap))
                heap += payload + (b"\x00" if len(payload) % 2 else b"")
            raw += struct.pack(e + "HHI", tag, typ, count) + value
        out.append(raw + b"\x00\x00\x00\x00")
    return (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8) + b"".join(out) + heap


def ascii_entry(tag: int, text: str):
    raw = text.encode() + b"\x00"
    return (tag, 2, len(raw), raw)


def user_comment_entry(raw: bytes):
    return (0x9286, 7, len(raw), raw)


def clean(p) -> None:
    """The JSON shape holds and no internal error was swallowed."""
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    json.dumps(d, ensure_ascii=False).encode("utf-8")  # no lone surrogate: every string is text UTF-8 can write
    assert set(d) == {"schema", "format", "metadata", "digital_source_type", "exif", "c2pa", "watermark",
                      "watermark_check", "notes"}
    assert not [n for n in d["notes"] if "internal error" in n], d["notes"]


# --- AUTOMATIC1111 -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["tEXt", "iTXt", "zTXt"])
def test_a1111_png(how):
    data = png(**{{"tEXt": "texts", "iTXt": "itxt", "zTXt": "ztxt"}[how]: [("parameters", A1111)]})
    p = read_provenance(data, watermark=False)
    clean(p)
    m = p.metadata
    assert m.tool == "automatic1111" and m.source == "png:parameters"
    assert m.prompt == "portrait of an old man with a beard, oil painting\nsoft light"
    assert m.negative_prompt == "blurry, lowres"
    assert (m.steps, m.sampler, m.scheduler, m.cfg_scale, m.seed) == (28, "DPM++ 2M", "Karras", 6.5, 3141592653)
    assert (m.width, m.height, m.model_name, m.model_hash) == (512, 768, "v1-5-pruned-emaonly", "6ce0161689")
    assert p.to_dict()["metadata"]["settings"]["Lora hashes"] == "detail: 0123abcd, style: 89ef4567"
    assert p.description() == (m.prompt, "metadata")
    assert p.recipe() == {"tool": "automatic1111", "prompt": m.prompt, "negative_prompt": "blurry, lowres",
                          "steps": 28, "guidance": 6.5, "width": 512, "height": 768, "seed": 3141592653,
                          "sampler": "DPM++ 2M", "scheduler": "Karras", "model_name": "v1-5-pruned-emaonly",
                          "model_hash": "6ce0161689"}
    assert p.claims_generated is True


def test_a1111_forge_and_no_negative(tmp_path):
    text = ("a cat\nSteps: 4, Sampler: Euler, CFG scale: 1, Seed: 7, Size: 1024x1024, Model: flux1-dev, "
            "Version: f2.0.1v1.10.1")
    path = tmp_path / "forge.png"
    path.write_bytes(png([("parameters", text)]))
    m = read_provenance(path, watermark=False).metadata
    assert (m.tool, m.prompt, m.negative_prompt, m.steps, m.model_name) == ("forge", "a cat", None, 4, "flux1-dev")


@pytest.mark.parametrize("order", ["big", "little", "ascii"])
def test_a1111_jpeg_user_comment(order):
    body = {"big": b"UNICODE\x00" + A1111.encode("utf-16-be"), "little": b"UNICODE\x00" + A1111.encode("utf-16-le"),
            "ascii": b"ASCII\x00\x00\x00" + A1111.encode()}[order]
    exif = tiff([ascii_entry(0x0131, "Stable Diffusion WebUI")], [user_comment_entry(body)], big_endian=order == "big")
    p = read_provenance(jpeg(exif=exif), watermark=False)
    clean(p)
    m = p.metadata
    assert m.source == "exif:UserComment" and m.tool == "automatic1111"
    assert m.prompt.startswith("portrait of an old man") and m.negative_prompt == "blurry, lowres"
    assert (m.seed, m.steps, m.model_hash) == (3141592653, 28, "6ce0161689")
    assert p.exif == {"software": "Stable Diffusion WebUI"}


def test_a1111_webp_exif():
    exif = tiff([], [user_comment_entry(b"UNICODE\x00" + A1111.encode("utf-16-be"))], big_endian=True)
    buf = io.BytesIO()
    picture().save(buf, "WEBP", exif=exif)
    p = read_provenance(buf.getvalue(), watermark=False)
    clean(p)
    assert p.format == "webp" and p.metadata.seed == 3141592653 and p.metadata.negative_prompt == "blurry, lowres"


# --- ComfyUI -------------------------------------------------------------------------------

COMFY_PROMPT = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x.safetensors",
                                                   "strength_model": 1, "strength_clip": 1}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow, photo", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0], "clip": ["10", 1]}},
    "12": {"class_type": "PrimitiveString", "inputs": {"value": "cartoon, watermark"}},
    "11": {"class_type": "ControlNetApplyAdvanced",
           "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["13", 0], "image": ["14", 0],
                      "strength": 0.8}},
    "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
    "14": {"class_type": "LoadImage", "inputs": {"image": "edge.png"}},
    "15": {"class_type": "Seed (rgthree)", "inputs": {"seed": 987654321}},
    "3": {"class_type": "KSampler", "inputs": {"seed": ["15", 0], "steps": 30, "cfg": 5.5, "sampler_name": "dpmpp_2m",
                                                "scheduler": "karras", "denoise": 1.0, "model": ["10", 0],
                                                "positive": ["11", 0], "negative": ["11", 1],
                                                "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_comfyui_png():
    workflow = {"last_node_id": 15, "nodes": [{"id": 3, "type": "KSampler"}], "links": []}
    p = read_provenance(png([("prompt", json.dumps(COMFY_PROMPT)), ("workflow", json.dumps(workflow))]),
                        watermark=False)
    clean(p)
    m = p.metadata
    assert m.tool == "comfyui" and m.source == "png:prompt"
    assert m.prompt == "a red fox in the snow, photo"
    assert m.negative_prompt == "cartoon, watermark"
    assert (m.seed, m.steps, m.cfg_scale, m.sampler, m.scheduler) == (987654321, 30, 5.5, "dpmpp_2m", "karras")
    assert (m.width, m.height, m.model_name) == (832, 1216, "sd_xl_base_1.0.safetensors")
    assert p.description() == ("a red fox in the snow, photo", "metadata")
    assert not [n for n in p.notes if "sampler nodes" in n]  # the ControlNet applier is no sampler


def test_comfyui_custom_sampler_and_workflow_only():
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["9", 0]}},
        "3": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["2", 0]}},
        "4": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["4", 0], "guider": ["3", 0],
                                                                "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                "latent_image": ["8", 0]}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768}},
    }
    m = read_provenance(png([("prompt", json.dumps(graph))]), watermark=False).metadata
    assert (m.prompt, m.model_name, m.width, m.height) == ("a lighthouse at dusk", "flux1-dev.safetensors", 1024, 768)
    p = read_provenance(png([("workflow", json.dumps({"nodes": []}))]), watermark=False)
    clean(p)
    assert p.metadata.tool == "comfyui" and p.metadata.prompt is None and p.description() == (None, None)


def test_comfyui_webp_exif():
    exif = tiff([ascii_entry(0x0110, "prompt:" + json.dumps(COMFY_PROMPT)), ascii_entry(0x010F, "workflow:{}")])
    buf = io.BytesIO()
    picture().save(buf, "WEBP", exif=exif)
    p = read_provenance(buf.getvalue(), watermark=False)
    clean(p)
    assert p.metadata.tool == "comfyui" and p.metadata.seed == 987654321
    assert p.exif is None  # graphs in Make/Model are not a camera


# --- InvokeAI, NovelAI, Fooocus ------------------------------------------------------------

def test_invokeai():
    meta = {"generation_mode": "txt2img", "positive_prompt": "a castle on a hill", "negative_prompt": "fog",
            "width": 768, "height": 512, "seed": 11, "steps": 25, "cfg_scale": 7.5, "scheduler": "euler_a",
            "model": {"name": "juggernaut", "hash": "blake3:abcd", "base": "sdxl"}, "app_version": "4.2.0"}
    p = read_provenance(png([("invokeai_metadata", json.dumps(meta))]), watermark=False)
    clean(p)
    m = p.metadata
    assert (m.tool, m.prompt, m.negative_prompt, m.seed, m.steps, m.cfg_scale) == (
        "invokeai", "a castle on a hill", "fog", 11, 25, 7.5)
    assert (m.model_name, m.model_hash, m.width, m.height) == ("juggernaut", "blake3:abcd", 768, 512)


def test_novelai():
    comment = {"prompt": "1girl, sky", "steps": 28, "height": 1216, "width": 832, "scale": 5, "seed": 5,
               "sampler": "k_euler_ancestral", "noise_schedule": "native", "uc": "lowres, bad anatomy"}
    p = read_provenance(png([("Software", "NovelAI"), ("Source", "NovelAI Diffusion V3 7BCCAA2C"),
                             ("Description", "1girl, sky"), ("Comment", json.dumps(comment))]), watermark=False)
    clean(p)
    m = p.metadata
    assert (m.tool, m.prompt, m.negative_prompt, m.seed, m.cfg_scale) == (
        "novelai", "1girl, sky", "lowres, bad anatomy", 5, 5.0)
    assert (m.model_name, m.model_hash, m.width) == ("NovelAI Diffusion V3 7BCCAA2C", "7BCCAA2C", 832)


def test_fooocus():
    meta = {"prompt": "a bowl of fruit", "negative_prompt": "", "steps": 30, "guidance_scale": 4,
            "resolution": "(1152, 896)", "seed": "123", "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras",
            "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689", "version": "Fooocus v2.5.5"}
    p = read_provenance(png([("parameters", json.dumps(meta)), ("fooocus_scheme", "fooocus")]), watermark=False)
    clean(p)
    m = p.metadata
    assert (m.tool, m.prompt, m.negative_prompt, m.seed, m.steps, m.cfg_scale) == (
        "fooocus", "a bowl of fruit", None, 123, 30, 4.0)
    assert (m.width, m.height, m.model_name, m.model_hash) == (1152, 896, "juggernautXL_v8Rundiffusion", "aeb7e9e689")


# --- XMP and EXIF --------------------------------------------------------------------------

XMP_ATTR = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
            'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/>'
            '</rdf:RDF></x:xmpmeta>')


def test_xmp_jpeg_trained_algorithmic_media():
    p = read_provenance(jpeg(app1=b"http://ns.adobe.com/xap/1.0/\x00" + XMP_ATTR.encode()), watermark=False)
    clean(p)
    assert p.digital_source_type == {
        "term": "trainedAlgorithmicMedia", "source": "xmp", "generative_ai": "yes",
        "uri": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}
    assert p.metadata is None and p.claims_generated is True


@pytest.mark.parametrize("form,term,generative", [
    ('<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/'
     'compositeWithTrainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType>', "compositeWithTrainedAlgorithmicMedia",
     "partly"),
    ('<Iptc4xmpExt:DigitalSourceType rdf:resource="http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"/>',
     "digitalCapture", "no"),
])
def test_xmp_png_element_forms(form, term, generative):
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description>{form}</rdf:Description>'
           '</rdf:RDF></x:xmpmeta>')
    p = read_provenance(png(itxt=[("XML:com.adobe.xmp", xmp)]), watermark=False)
    clean(p)
    assert (p.digital_source_type["term"], p.digital_source_type["generative_ai"]) == (term, generative)
    assert p.claims_generated is (generative != "no")


def test_exif_camera_fields():
    exif = tiff([ascii_entry(0x010F, "Canon"), ascii_entry(0x0110, "Canon EOS R5"),
                 ascii_entry(0x0131, "Firmware 1.8")])
    p = read_provenance(jpeg(exif=exif), watermark=False)
    clean(p)
    assert p.exif == {"make": "Canon", "model": "Canon EOS R5", "software": "Firmware 1.8"}
    assert p.metadata is None and p.claims_generated is None


def test_exif_wrong_types_do_not_raise():
    exif = tiff([(0x010F, 3, 1, b"\x05\x00"),  # Make as SHORT
                 ascii_entry(0x0110, "Pixel 8"),
                 (0x0131, 4, 3, struct.pack("<III", 1, 2, 3)),  # Software as LONGs
                 (0x9999, 99, 1, b"\x00\x00")],  # unknown type
                [(0x9286, 3, 2, b"\x01\x00\x02\x00"),  # UserComment as SHORT
                 (0x9000, 7, 1000, b"\x00" * 8)])  # count far past the block
    p = read_provenance(jpeg(exif=exif), watermark=False)
    clean(p)
    assert p.exif == {"model": "Pixel 8"} and p.metadata is None
    assert any("make has type 3" in n for n in p.notes) and any("UserComment has type 3" in n for n in p.notes)
    # an Exif IFD pointer of the wrong type, and an IFD0 offset outside the block
    bad = tiff([ascii_entry(0x8769, "nope")])
    clean(read_provenance(jpeg(exif=bad), watermark=False))
    clean(read_provenance(jpeg(exif=b"II*\x00\xff\xff\xff\x7f"), watermark=False))
    clean(read_provenance(jpeg(exif=b"XX"), watermark=False))


# --- hostile files -------------------------------------------------------------------------

def test_hostile_png_chunks():
    base = png()
    bomb = zlib.compress(b"A" * (64 << 20), 9)  # a 64 MiB zTXt from ~64 KiB
    hostile = with_chunks(
        base,
        png_chunk(b"tEXt", b"huge\x00" + b"x" * (9 << 20)),  # over the per-chunk limit
        png_chunk(b"zTXt", b"parameters\x00\x00" + bomb),
        png_chunk(b"iTXt", b"Description\x00\x00\x00\x00\x00\xff\xfe bad utf-8 \xc3\x28"),
        png_chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00not zlib at all"),
        png_chunk(b"tEXt", b"prompt\x00{\"3\": {\"class_type\": \"KSampler\", \"inputs\": "),  # cut JSON
        png_chunk(b"tEXt", b"invokeai_metadata\x00[1, 2, 3]"),
        png_chunk(b"tEXt", b"workflow\x00" + b"[" * 200_000),  # recursion bomb for json
        png_chunk(b"tEXt", b"no keyword separator"),
        png_chunk(b"iTXt", b"x\x00"),
        png_chunk(b"zTXt", b"y\x00\x07abc"),
    )
    p = read_provenance(hostile, watermark=False)
    clean(p)
    assert p.metadata is None or p.metadata.prompt is None or len(p.metadata.prompt) <= 64 << 10
    notes = " | ".join(p.notes)
    assert "too large" in notes and "not valid JSON" in notes and "expands past" in notes
    # a chunk whose length runs past the end of the file, and one claiming 4 GiB
    clean(read_provenance(base[:33] + png_chunk(b"tEXt", b"parameters\x00abc", length=1 << 20), watermark=False))
    clean(read_provenance(base[:33] + struct.pack(">I", 0xFFFFFFFF) + b"tEXt" + b"k\x00v", watermark=False))


def test_json_escaped_lone_surrogates_become_replacement_characters():
    """JSON's `\\ud800` escape decodes to a lone surrogate, which UTF-8 cannot encode: a ComfyUI prompt
    holding one failed `resynth attribute` with a traceback (UnicodeEncodeError hashing the description)."""
    comfy = json.dumps(COMFY_PROMPT).replace("red fox", "red \\ud800fox")
    fields = [("prompt", comfy),
              ("invokeai_metadata", '{"positive_prompt": "a dog \\uDFFF", "model": {"name": "m\\udc80"}, "seed": 1}'),
              ("parameters", '{"prompt": "a cat \\ud83d", "base_model": "x\\ud800", "Seed": 1}'),  # Fooocus
              ("parameters", A1111.replace("Model: v1-5-pruned-emaonly", 'Model: "pruned\\ud800"'))]
    got = []
    for key, text in fields:
        p = read_provenance(png([(key, text)]), c2pa=False, watermark=False)
        clean(p)
        got.append(p.metadata)
    assert "red \ufffdfox" in got[0].prompt and got[1].prompt == "a dog \ufffd"
    assert got[1].model_name == "m\ufffd" and got[2].prompt == "a cat \ufffd" and got[2].model_name == "x\ufffd"
    assert got[3].model_name == "pruned\ufffd"
    surrogate_pair = read_provenance(png([("prompt", comfy.replace("\\ud800", "\\ud83d\\ude00"))]), watermark=False)
    assert "red \U0001f600fox" in surrogate_pair.metadata.prompt  # a valid pair is one character, kept


def test_a_prompt_of_control_characters_is_no_prompt_to_redraw():
    """An A1111 prompt of NUL and other control characters (a tEXt chunk holds any byte): the query's description
    fell back to the captioner, but the redraw from the recipe drew it, stored an empty description and stated
    a conflict with the claimed model."""
    from engine.provenance.reproduce import recipe_of

    text = "\x00\x01\x1b\nNegative prompt: x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 64x64, Model: m"
    p = read_provenance(png([("parameters", text)]), c2pa=False, watermark=False)
    assert p.metadata.prompt == "\x00\x01\x1b" and p.metadata.seed == 5
    assert recipe_of(p.metadata, None, (64, 64)) == "no prompt in the metadata"


def test_hostile_comfy_graphs():
    cyclic = {"1": {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "negative": ["1", 0], "seed": ["1", 0],
                                                         "model": ["3", 0], "steps": "many", "cfg": float("nan")}},
              "2": {"class_type": "ConditioningCombine", "inputs": {"a": ["2", 0], "b": ["1", 0], "text": 5}},
              "3": {"class_type": "LoraLoader", "inputs": {"model": ["3", 0]}}}
    odd = ({"1": "not a node"}, {"1": {"inputs": []}}, [1, 2], "text", {"1": {"inputs": {"positive": 7}}})
    for graph in (cyclic, *odd):
        text = json.dumps(graph, allow_nan=True)
        clean(read_provenance(png([("prompt", text)]), watermark=False))
    m = read_provenance(png([("prompt", json.dumps(cyclic))]), watermark=False).metadata
    assert (m.prompt, m.seed, m.steps, m.cfg_scale, m.model_name) == (None, None, None, None, None)


def test_mutated_files_never_raise():
    """Seeded byte-level fuzzing of valid files with metadata: never an exception."""
    rng = random.Random(1234)
    exif = tiff([ascii_entry(0x010F, "Canon")], [user_comment_entry(b"UNICODE\x00" + A1111.encode("utf-16-be"))])
    seeds = [png([("parameters", A1111), ("prompt", json.dumps(COMFY_PROMPT))]), jpeg(exif=exif),
             jpeg(app1=b"http://ns.adobe.com/xap/1.0/\x00" + XMP_ATTR.encode())]
    for _ in range(150):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(len(data))
            if rng.random() < 0.8:
                data[i] = rng.randrange(256)
            else:
                del data[i:i + rng.randint(1, 64)]
        clean(read_provenance(bytes(data), c2pa=False, watermark=False))
    for blob in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a", b"hello"):
        clean(read_provenance(blob, c2pa=False, watermark=False))


def test_bad_arguments():
    with pytest.raises(TypeError):
        read_provenance(12)
    with pytest.raises(OSError):
        read_provenance("/nonexistent/image.png")


# --- C2PA ----------------------------------------------------------------------------------

def _test_ca(tmp_path):
    """A test root and an end-entity signing certificate (C2PA rejects self-signed leaf certs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "resynth tests")])

    def usage(**on):
        keys = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{k: on.get(k, False) for k in keys})

    def cert(subject, issuer, key, signing_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(usage(key_cert_sign=True, crl_sign=True) if ca else usage(digital_signature=True),
                            critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if not ca:
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                                critical=False))
        return b.sign(signing_key, hashes.SHA256())

    ca_key, ee_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("resynth test root"), name("resynth test root"), ca_key, ca_key, True)
    ee = cert(name("resynth test signer"), ca.subject, ee_key, ca_key, False)
    pem = serialization.Encoding.PEM
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(ca.public_bytes(pem))
    key = ee_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ee.public_bytes(pem) + ca.public_bytes(pem), key, anchors


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    c2pa = pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    chain, key, anchors = _test_ca(tmp_path_factory.mktemp("c2pa"))
    manifest = {"claim_generator_info": [{"name": "resynth-tests", "version": "1.0"}], "title": "generated.png",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "softwareAgent": {"name": "TestDiffusion"},
                    "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None))
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/png", io.BytesIO(png(size=(96, 96))), out)
    return out.getvalue(), anchors


def test_c2pa_valid_with_anchor_untrusted_without(signed, monkeypatch):
    data, anchors = signed
    monkeypatch.delenv("RESYNTH_C2PA_TRUST_ANCHORS", raising=False)
    p = read_provenance(data, trust_anchors=anchors, watermark=False)
    clean(p)
    c = p.c2pa
    assert c["state"] == "valid", c
    assert c["claim_generator"].startswith("resynth-tests") and c["title"] == "generated.png"
    assert c["actions"] == [{"action": "c2pa.created", "software_agent": "TestDiffusion",
                             "digital_source_type": "trainedAlgorithmicMedia"}]
    assert c["signer"]["common_name"] == "resynth test signer"
    assert p.digital_source_type["source"] == "c2pa" and p.digital_source_type["term"] == "trainedAlgorithmicMedia"
    assert read_provenance(data, watermark=False).c2pa["state"] == "untrusted"
    monkeypatch.setenv("RESYNTH_C2PA_TRUST_ANCHORS", str(anchors))
    assert read_provenance(data, watermark=False).c2pa["state"] == "valid"


def test_c2pa_tampered_and_absent(signed, tmp_path):
    data, anchors = signed
    im = Image.open(io.BytesIO(data))
    assert im.size == (96, 96)
    # change the pixels, keep the manifest chunk: re-encode IDAT only
    idat_at = data.index(b"IDAT") - 4
    (n,) = struct.unpack(">I", data[idat_at:idat_at + 4])
    raw = bytearray(zlib.decompress(data[idat_at + 8:idat_at + 8 + n]))
    raw[100] ^= 0xFF
    body = zlib.compress(bytes(raw))
    tampered = data[:idat_at] + png_chunk(b"IDAT", body) + data[idat_at + 12 + n:]
    c = read_provenance(tampered, trust_anchors=anchors, watermark=False).c2pa
    assert c["state"] == "invalid" and c["failures"], c
    assert read_provenance(png(), trust_anchors=anchors, watermark=False).c2pa["state"] == "none"
    missing = read_provenance(png(), trust_anchors=tmp_path / "absent.pem", watermark=False).c2pa
    assert missing["state"] == "unavailable" and "not readable" in missing["reason"]
    assert read_provenance(data, c2pa=False, watermark=False).c2pa == {"state": "skipped"}
    # a broken file with no manifest is "none"; a broken manifest is "invalid"
    assert read_provenance(png()[:200], watermark=False).c2pa["state"] == "none"
    jumbf_at = data.index(b"jumb")
    broken = data[:jumbf_at + 40] + bytes(64) + data[jumbf_at + 104:]
    assert read_provenance(broken, trust_anchors=anchors, watermark=False).c2pa["state"] == "invalid"


# --- invisible watermarks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    imwatermark = pytest.importorskip("imwatermark")
    return imwatermark.WatermarkEncoder


@pytest.mark.parametrize("which", ["sdxl", "sd1"])
def test_watermark_detected_and_absent(encoder, which):
    from engine.provenance.watermark import SDXL_BITS

    image = picture((512, 512), seed=3)
    enc = encoder()
    if which == "sdxl":
        enc.set_watermark("bits", SDXL_BITS)
    else:
        enc.set_watermark("bytes", b"StableDiffusionV1")
    bgr = np.asarray(image)[:, :, ::-1].copy()
    marked = Image.fromarray(np.ascontiguousarray(enc.encode(bgr, "dwtDct")[:, :, ::-1]))
    buf, plain = io.BytesIO(), io.BytesIO()
    marked.save(buf, "PNG")
    image.save(plain, "PNG")
    p = read_provenance(buf.getvalue(), c2pa=False)
    clean(p)
    assert p.watermark is not None and p.watermark["name"] == which, p.watermark
    assert p.watermark["agreement"] >= 0.9 and "erase" in p.watermark["note"]
    assert p.claims_generated is True
    q = read_provenance(plain.getvalue(), c2pa=False)
    assert q.watermark is None and q.watermark_check["state"] == "checked" and "erase" in q.watermark_check["note"]
    # resizing erases it: the documented limitation, not a bug
    small = io.BytesIO()
    marked.resize((384, 384)).save(small, "PNG")
    assert read_provenance(small.getvalue(), c2pa=False).watermark is None


def test_watermark_small_image_is_skipped():
    p = read_provenance(png(size=(64, 64)), c2pa=False)
    assert p.watermark is None and p.watermark_check["state"] in ("skipped", "unavailable")


def test_the_watermark_check_skips_a_file_engine_images_refuses_from_its_structure(encoder):
    """The check opened images with Pillow without engine.images' structure walk: a PNG of 2000 colour profiles
    (iCCP chunks, each inflating to 1 MB) took 1.2 s of CPU there, 19,000 of them 38 s; attribution refuses it."""
    plain = png(size=(300, 300))
    profiles = plain[:33] + png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(1 << 20), 9)) * 2000 + plain[33:]
    p = read_provenance(profiles, c2pa=False)
    assert p.watermark is None and p.watermark_check["state"] == "skipped", p.watermark_check
    assert p.watermark_check["reason"].startswith("more than 4 PNG colour profiles"), p.watermark_check
    assert read_provenance(plain, c2pa=False).watermark_check["state"] == "checked"


def test_core_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from engine.provenance import read_provenance; "
            "read_provenance(open(sys.argv[1], 'rb').read(), c2pa=False); print('torch' in sys.modules)")
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png([("parameters", A1111)], size=(300, 300)))
        f.flush()
        out = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_hostile_text_stays_cheap():
    """Pattern matching on long hostile values is linear: a few MB of crafted text, well under seconds."""
    import time

    cases = [png([("parameters", "a" * (2 << 20))]), png([("parameters", "k: v, " * (300_000))]),
             png(itxt=[("XML:com.adobe.xmp", "a" * (2 << 20))]),
             png(itxt=[("XML:com.adobe.xmp", "<x:DigitalSourceType " * 100_000)]),
             png(itxt=[("XML:com.adobe.xmp", "x:DigitalSourceType=" * 100_000)]),
             png([("prompt", json.dumps({str(i): {"class_type": "KSampler", "inputs": {"positive": [str(i + 1), 0]}}
                                         for i in range(4000)}))])]
    for data in cases:
        started = time.process_time()
        clean(read_provenance(data, c2pa=False, watermark=False))
        assert time.process_time() - started < 3.0


def test_a_comfy_node_linking_to_itself_is_walked_once():
    """A sampler whose seed, steps, cfg ... link to itself, beside 200,000 other inputs (1.9 MB): each value was
    looked for through MAX_DEPTH hops, every input scanned at each, 9 s of CPU for one file."""
    import time

    linked = ("seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "latent_image")
    inputs: dict = {key: ["1", 0] for key in linked}
    inputs.update({f"{i:x}": 0 for i in range(200_000)})
    graph = json.dumps({"1": {"class_type": "KSampler", "inputs": inputs}}, separators=(",", ":"))
    assert len(graph) < 2 << 20  # read whole (MAX_TEXT)
    started = time.process_time()
    p = read_provenance(png([("prompt", graph)]), c2pa=False, watermark=False)
    assert time.process_time() - started < 2.0, time.process_time() - started
    clean(p)
    assert p.metadata.tool == "comfyui" and (p.metadata.seed, p.metadata.steps, p.metadata.sampler) == (None,) * 3


def test_a_comfy_prompt_of_many_texts_is_gathered_in_linear_time():
    """A sampler's positive input linking to 4000 nodes of 8 prompt texts each (900 KB): each new text was
    looked for in the list of those found, 32,000 x 32,000 / 2 comparisons, 12 s of CPU for one file."""
    import time

    keys = ("text", "text_g", "text_l", "prompt", "string", "value", "text_positive", "text_negative")
    graph: dict = {"1": {"class_type": "KSampler", "inputs": {"steps": 2, "positive": ["2", 0], "latent_image": 0}},
                   "2": {"class_type": "Combine", "inputs": {f"c{i}": [str(i + 3), 0] for i in range(4000)}}}
    graph.update({str(i + 3): {"inputs": {k: f"{k}{i}" for k in keys}} for i in range(4000)})
    text = json.dumps(graph, separators=(",", ":"))
    assert len(text) < 1 << 20  # within Pillow's text chunk limit: what a query file may carry
    started = time.process_time()
    p = read_provenance(png([("prompt", text)]), c2pa=False, watermark=False)
    assert time.process_time() - started < 2.0, time.process_time() - started
    clean(p)
    assert p.metadata.prompt.startswith("text0\ntext_g0\n")


def test_jpeg_fill_bytes_are_skipped_as_a_run():
    """0xFF fill bytes may precede any JPEG marker: walked one by one, 20 MB of them took 11 s of CPU in
    read_provenance (the image reader refuses such a file, but the library reads any bytes it is given)."""
    import time

    base = jpeg()
    comment = A1111.encode()
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    filled = base[:2] + b"\xff" * 5 + segment + base[2:]  # a few fill bytes before a marker: still read
    assert read_provenance(filled, c2pa=False, watermark=False).metadata.seed == 3141592653
    started = time.process_time()
    clean(read_provenance(b"\xff\xd8" + b"\xff" * (20 << 20) + b"\xd9", c2pa=False, watermark=False))
    assert time.process_time() - started < 2.0, time.process_time() - started


def test_c2pa_remote_manifest_is_never_fetched(tmp_path):
    """A file whose manifest lives at a URL: reported as `remote`, and no connection is made."""
    import socket
    import threading

    c2pa = pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    chain, key, _ = _test_ca(tmp_path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.1)
    hits = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/manifest.c2pa"
    manifest = {"claim_generator_info": [{"name": "resynth-tests"}], "title": "remote.png",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]}
    out = io.BytesIO()
    try:
        with c2pa.Builder(manifest) as builder:
            builder.set_no_embed()
            builder.set_remote_url(url)
            builder.sign(c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None)), "image/png",
                         io.BytesIO(png()), out)
        c = read_provenance(out.getvalue(), watermark=False).c2pa
    finally:
        stop.set()
        thread.join()
        server.close()
    assert c["state"] == "remote" and c["remote_url"] == url, c
    assert hits == []


def test_a_file_without_manifest_markers_skips_the_native_reader(signed, monkeypatch):
    """The fast path: no JUMBF box type or label in the bytes and no provenance URL in the XMP means no
    manifest, without the native reader; a signed file, and a plain one with a provenance XMP, still go
    to the reader."""
    c2pa = pytest.importorskip("c2pa")
    from engine.provenance import c2pa_check

    calls = []
    real = c2pa.Reader.try_create
    monkeypatch.setattr(c2pa.Reader, "try_create", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert read_provenance(png([("parameters", "a cat\nSteps: 20")]), watermark=False).c2pa["state"] == "none"
    assert calls == []
    data, anchors = signed
    assert read_provenance(data, trust_anchors=anchors, watermark=False).c2pa["state"] == "valid"
    assert calls == [1]
    xmp = '<x:xmpmeta><rdf:Description dcterms:provenance="https://example.org/m.c2pa"/></x:xmpmeta>'
    read_provenance(png(itxt=[("XML:com.adobe.xmp", xmp)]), watermark=False)
    assert calls == [1, 1]
    assert not c2pa_check.may_carry_manifest(png(), None)
    tiff = io.BytesIO()  # an XMP the container reader does not parse (TIFF tag 700): seen in the raw bytes
    Image.new("RGB", (8, 8)).save(tiff, "TIFF", tiffinfo={700: xmp.encode()})
    assert read_provenance(tiff.getvalue(), watermark=False).c2pa["state"] == "remote" and calls == [1, 1, 1]


def test_a_manifest_of_many_action_assertions_is_summarised_in_a_few(tmp_path):
    """Each c2pa.actions assertion lists up to 20 actions, and a manifest may hold many: 50 of them in a
    250 KB file put 1020 actions in the answer (a 20 MB upload: megabytes per image). The first 20 are kept."""
    c2pa = pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    chain, key, _ = _test_ca(tmp_path)
    edited = {"action": "c2pa.edited", "softwareAgent": {"name": "x" * 100}}
    created = {"action": "c2pa.created",
               "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}
    assertions = [{"label": "c2pa.actions", "data": {"actions": [created] + [edited] * 19}}]
    assertions += [{"label": "c2pa.actions", "data": {"actions": [edited] * 20}}] * 50
    manifest = {"claim_generator_info": [{"name": "t", "version": "1"}], "title": "g.png", "assertions": assertions}
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None)), "image/png",
                     io.BytesIO(png(size=(96, 96))), out)
    p = read_provenance(out.getvalue(), watermark=False)
    clean(p)
    assert p.c2pa["state"] == "untrusted" and len(p.c2pa["actions"]) == 20, len(p.c2pa["actions"])
    assert p.c2pa["actions"][0]["action"] == "c2pa.created"
    assert p.c2pa["digital_source_type"] == "trainedAlgorithmicMedia"


def test_mutated_signed_files_never_raise(signed):
    data, anchors = signed
    rng = random.Random(99)
    states = set()
    for _ in range(40):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        p = read_provenance(bytes(mutated), trust_anchors=anchors, watermark=False)
        clean(p)
        states.add(p.c2pa["state"])
    assert states <= {"valid", "untrusted", "invalid", "none"} and "invalid" in states
