"""The upstream files the book reads, pinned: each asset's source (a repository at a fixed commit), path, git blob
hash, record count and licence. ``data`` finds, verifies and downloads them by these entries.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ASSETS", "Asset",
]

STANFORD_ALPACA = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a"
SELF_INSTRUCT = "https://raw.githubusercontent.com/yizhongw/self-instruct/0b26ccaa415992100fa32df62d41b994cf928e23"
TORCHTUNE = "https://raw.githubusercontent.com/pytorch/torchtune/bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1"
LLAMA_FACTORY = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30"
ALPACA_EVAL = "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20"
TRUTHFULQA = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/f6be04e52bbcb41d4d20daee6358231d4a5015d2"
CC_BY_NC = "CC BY-NC 4.0 (Alpaca data)"
ALPACA_EVAL_LICENCE = f"Apache-2.0 (alpaca_eval); data {CC_BY_NC}"


@dataclass(frozen=True)
class Asset:
    """One upstream file pinned to a commit, with the hash that proves it is that file."""

    name: str
    filename: str
    url: str | None  # None: a file derived from upstream files, with no upstream download of its own
    licence: str
    records: int | None
    description: str
    sha256: str | None = None
    git_blob: str | None = None  # sha1 of b"blob <len>\0" + data, for files with no published sha256


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in [
        Asset(
            "seed_tasks", "seed_tasks.jsonl", f"{STANFORD_ALPACA}/seed_tasks.jsonl",
            "Apache-2.0 (stanford_alpaca code); CC BY-NC 4.0 (stanford_alpaca DATA_LICENSE)", 175,
            "The 175 human-written self-instruct seed tasks.",
            sha256="7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
            git_blob="c97d40d76abd45cd7456f2d0d58459bb4df3cad5",
        ),
        Asset(
            "prompt", "prompt.txt", f"{STANFORD_ALPACA}/prompt.txt",
            "Apache-2.0 (stanford_alpaca)", None,
            "The generation prompt Alpaca sent to text-davinci-003.",
            sha256="c042d2a46d3bdc4fa4406deeed5951dc2dcd4ebf29ebf8237210c384f09b5b2d",
            git_blob="8bdf51d2d893e4a6b584308e96c23f3a2257389c",
        ),
        Asset(
            "alpaca_data", "alpaca_data.json", f"{STANFORD_ALPACA}/alpaca_data.json",
            CC_BY_NC, 52002,
            "The full 52K Alpaca training set (text-davinci-003 outputs).",
            git_blob="3779ddbc040543ab1834ef216c983d6fcc06cc9a",
        ),
        Asset(
            "alpaca_sample", "alpaca_first100.json", f"{TORCHTUNE}/tests/assets/alpaca_tiny.json",
            f"BSD-3-Clause (torchtune); content {CC_BY_NC}", 100,
            "The first 100 records of the 52K Alpaca release, as kept in torchtune's test assets.",
            sha256="b1e3ff228aa9c61b524f85f859640fd07c0b94895047222dba6deec978afdfc0",
            git_blob="8a7180809d571d540cede007d6d3b89159932390",
        ),
        Asset(
            "alpaca_gpt4_demo", "alpaca_en_demo.json", f"{LLAMA_FACTORY}/data/alpaca_en_demo.json",
            f"Apache-2.0 (LLaMA-Factory); content {CC_BY_NC}", 999,
            "999 Alpaca instructions with GPT-4 outputs (not the original davinci targets).",
            sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
            git_blob="b645c416b5204f25fab66f839a44203a9ad5a2a4",
        ),
        Asset(
            "eval_instructions", "user_oriented_instructions.jsonl",
            f"{SELF_INSTRUCT}/human_eval/user_oriented_instructions.jsonl",
            "Apache-2.0 (self-instruct); its README asks that it not be used for training", 252,
            "The 252 user-oriented evaluation instructions of self-instruct.",
            sha256="81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
            git_blob="ed6d5d986e3f4c65ff64d70328a2e1dab146f914",
        ),
        Asset(
            "davinci_eval_answers", "self_instruct_text-davinci-003_predictions.jsonl",
            f"{SELF_INSTRUCT}/human_eval/predictions/text-davinci-003_predictions.jsonl",
            "Apache-2.0 (self-instruct); evaluation only", 252,
            "text-davinci-003's real answers to the 252 user-oriented instructions, in their order.",
            sha256="9fbf9229c917f2c832399e4d474f0ed1a4f367fae61e5eee814f3db687e0d584",
            git_blob="46f4178c7a6b5dbe8b8005f43aac7c44e4626822",
        ),
        Asset(
            "alpaca_eval_alpaca_7b", "alpaca_eval_alpaca-7b_outputs.json",
            f"{ALPACA_EVAL}/results/alpaca-7b/model_outputs.json", ALPACA_EVAL_LICENCE, 805,
            "The released Alpaca-7B's answers to AlpacaEval's 805 instructions.",
            sha256="21048628f20187affc7d9c9e756d9618e08c4991fc8a48184612eb484565c5db",
            git_blob="d2215d7435178ad085c79086991f6a30286cc25b",
        ),
        Asset(
            "alpaca_eval_davinci_003", "alpaca_eval_text_davinci_003_outputs.json",
            f"{ALPACA_EVAL}/results/text_davinci_003/model_outputs.json", ALPACA_EVAL_LICENCE, 805,
            "text-davinci-003's answers to AlpacaEval's 805 instructions (AlpacaEval 1's reference).",
            sha256="af0bc112f08c88bf589bbfe6fc1036806d0a0f6fec9c4d5a4db860f5afe73b4b",
            git_blob="9b42638dd9c74a21adaaff9fed3de9f3f0f43ed2",
        ),
        Asset(
            "alpaca_eval_gpt4_annotations", "alpaca_eval_gpt4_annotations_alpaca-7b.json",
            f"{ALPACA_EVAL}/results/alpaca-7b/alpaca_eval_gpt4/annotations.json", ALPACA_EVAL_LICENCE, 805,
            "GPT-4's 805 pairwise judgements of text-davinci-003 (output_1) against Alpaca-7B (output_2).",
            sha256="d44ea50f1a81f6ae6a95e8ac1dd08b7eca82cc0a9058a2923b1c70cec1e9eaa5",
            git_blob="94acc5749aa3a2672777aaf1448b412f5e27ea45",
        ),
        Asset(
            "alpaca_eval_turbo_annotations", "alpaca_eval_turbo_annotations_vicuna-13b-v1.5_glm_preference.json",
            f"{ALPACA_EVAL}/results/vicuna-13b-v1.5/weighted_alpaca_eval_gpt4_turbo/weighted_alpaca_eval_gpt4_turbo/annotations.json",
            ALPACA_EVAL_LICENCE, 805,
            "GPT-4-turbo's soft judgements of gpt4_1106_preview (output_1) against vicuna-13b-v1.5 (AlpacaEval 2).",
            sha256="006353d44b04662232ff463ad4cf1de4ec73901a0544a521e2eb89905166f212",
            git_blob="234304d0a22181d179d919ced4d1f466d4e81316",
        ),
        Asset(
            "alpaca_eval_leaderboard", "alpaca_eval_gpt4_leaderboard.csv",
            f"{ALPACA_EVAL}/src/alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            ALPACA_EVAL_LICENCE, None,
            "AlpacaEval 1's leaderboard (GPT-4 judge, text-davinci-003 reference): win rate, SE, LC.",
            sha256="9a86bb8cd16967ab94796ca6e52b63a14ceb59c953194ec064edfe690fb82ed6",
            git_blob="5f2acea5fe974fa1c84e90bd96effba78171b0dd",
        ),
        Asset(
            "instruction_difficulty", "alpaca_eval_instruction_difficulty.csv", None, ALPACA_EVAL_LICENCE, 805,
            "AlpacaEval's 805 instruction difficulties (length-controlled GLM), derived from the GPT-4-turbo "
            "annotations and vicuna-13b-v1.5's published fit (SOURCES.md); upstream keeps it on the HF hub only.",
            sha256="4942ecebe4025c99335d1f2ff73461dfc0e3b79e6aa4498de238cb95ce5cca1f",
        ),
        Asset(
            "truthfulqa", "TruthfulQA.csv", f"{TRUTHFULQA}/TruthfulQA.csv", "Apache-2.0 (TruthfulQA)", 790,
            "TruthfulQA's 790 questions with categories and true/false reference answers.",
            sha256="b8d8ef1e12f98b4f2a9f47abc9765da0640b182b6c5d9b92f0c1a1f2f1e02e5c",
            git_blob="4206d1e78db1b13612062ac816f6db0443d0e92b",
        ),
        Asset(
            "truthfulqa_mc", "TruthfulQA_mc_task.json", f"{TRUTHFULQA}/data/mc_task.json", "Apache-2.0 (TruthfulQA)", 790,
            "TruthfulQA's multiple-choice targets: MC1 (one true answer) and MC2 (several).",
            sha256="c90d853454fd48c676accb33e16923ac438dbb6fb37ecc7c6a70e33c9e556e87",
            git_blob="fbfbefb4b045739ffa7a4a6a695d96e77a0b68a5",
        ),
    ]
}
# The offline copies in a data dir may carry another name than the upstream file (SOURCES.md).
ALTERNATE_FILENAMES = {"alpaca_sample": ("alpaca_tiny_first100.json",), "alpaca_gpt4_demo": ("alpaca_en_demo_gpt4outputs.json",)}
