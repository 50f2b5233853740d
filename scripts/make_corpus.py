"""Generate the embedded multi-domain corpus and its byte-level BPE tokenizer, deterministically.

    python scripts/make_corpus.py                 # rewrites tram_dist/data/{corpus,tokenizer}/
    python scripts/make_corpus.py --out /tmp/x    # writes /tmp/x/corpus/ and /tmp/x/tokenizer/

The corpus is synthetic text in M2D2's layout (`{domain}/{train,valid,test}.txt`, one paragraph
per line, blank lines between some paragraphs as in M2D2's files). Each domain has its own
vocabulary and sentence templates; domains borrow words from their neighbours with a small
probability, so a model trained on `math` is closest to `physics` and `cs` and farthest from
`art` (the same near/far structure as S2ORC's MATH -> PHYS./ART shift in the TRAM paper).

Determinism: only `random.Random(seed).random()` is used (the one stream Python guarantees
across versions), every choice is derived from it here, files are written with "\\n" line ends,
and the BPE trainer runs on one thread (RAYON_NUM_THREADS=1) over a fixed file order.
tests/data/test_corpus_regen.py regenerates into a temporary folder and compares bytes.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

# One thread for the BPE trainer: merge ties are then resolved in one fixed order.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 20240507  # corpus seed (any fixed int; changing it changes every shipped file)
TRAIN_DOMAIN = "math"  # the domain with the large train split
EOS = "<|endoftext|>"  # GPT-2's document separator, also bos/unk/pad of the tokenizer
VOCAB_SIZE = 3072  # BPE vocabulary size including the 256 byte symbols and EOS
# Target sizes in bytes (the generator stops at the first paragraph that reaches them).
TRAIN_BYTES_MAIN = 320_000  # train split of the training domain
TRAIN_BYTES_OTHER = 40_000  # train split of every other domain (so any domain can be trained on)
EVAL_BYTES = 20_000  # valid and test splits of every domain

# Shared function words and generic templates (used by every domain with its own words).
GENERIC = [
    "The {adj} {noun} {verb} the {noun}.",
    "In this {work}, we {vbase} a {adj} {noun} and show that it {verb} the {noun}.",
    "Each {noun} {verb} a {adj} {noun}, which {verb} the {plural} of the {noun}.",
    "However, the {noun} of a {adj} {noun} {verb} {plural} only when the {noun} is {adj}.",
    "We {vbase} the {adj} {plural} and the {plural} that {vbase} them.",
    "This {noun} is {adj}, so the {noun} {verb} {num} {plural}.",
    "It is {adj} to {vbase} the {noun} before the {noun} {verb} the {noun}.",
    "Our results suggest that {adj} {plural} {vbase} {adj} {plural}.",
]

DOMAINS = {
    "math": {
        "neighbours": ["physics", "cs"],
        "work": ["paper", "note", "section", "proof"],
        "noun": "theorem lemma group ring field manifold operator function space sequence series "
                "integral derivative matrix vector polynomial graph set subset bound inequality "
                "module category morphism topology measure norm kernel ideal equation prime "
                "domain limit homomorphism eigenvalue metric lattice curve surface".split(),
        "verb": "converges vanishes satisfies implies defines admits generates preserves bounds "
                "extends induces maps contains divides equals approximates dominates".split(),
        "adj": "compact finite abelian continuous smooth linear bounded convex orthogonal "
               "invariant injective surjective nilpotent symmetric measurable dense closed "
               "open irreducible holomorphic".split(),
        "templates": [
            "Let ${sym}$ be a {adj} {noun} and let ${sym}$ be a {adj} {noun}.",
            "Then ${sym} \\leq {num} {sym}^{num}$ for every {adj} {noun} ${sym}$.",
            "By Lemma {num}.{num}, the {noun} ${sym}$ is {adj} if and only if ${sym}$ is {adj}.",
            "Suppose that ${sym}_{num} = {sym}_{num} + {sym}$; then the {noun} {verb} the {noun}.",
            "We prove that every {adj} {noun} {verb} a {adj} {noun} of dimension {num}.",
            "Theorem {num}. If ${sym}$ is {adj}, then ${sym} \\to {sym}$ as $n \\to \\infty$.",
            "Proof. Since ${sym}({sym}) = {num}$, the {noun} is {adj}, which completes the proof.",
        ],
        "sym": list("xyzfgGHMNpqknT") + ["\\alpha", "\\lambda", "\\mu", "\\omega"],
    },
    "physics": {
        "neighbours": ["math", "biology"],
        "work": ["experiment", "paper", "simulation", "measurement"],
        "noun": "particle field energy momentum photon electron spin lattice wave temperature "
                "pressure detector laser magnet crystal phase transition boson quark neutrino "
                "plasma galaxy star spectrum frequency amplitude potential density entropy "
                "Hamiltonian resonance beam".split(),
        "verb": "scatters decays oscillates radiates absorbs emits couples propagates "
                "accelerates cools heats measures excites polarizes condenses".split(),
        "adj": "quantum thermal magnetic relativistic coherent massive stable excited "
               "superconducting turbulent cosmic optical nonlinear adiabatic ferromagnetic "
               "metastable".split(),
        "templates": [
            "We measure the {noun} at a temperature of {num} K and a field of {num} T.",
            "The {adj} {noun} {verb} with a cross section of {num} mb at {num} GeV.",
            "Our {work} shows that the {noun} {verb} when the {noun} exceeds {num} eV.",
            "The Hamiltonian $H = {sym} + {sym}^{num}$ describes the {adj} {noun}.",
            "A {adj} {noun} of mass {num} MeV {verb} into two {plural}.",
            "The {noun} of the {adj} {noun} is measured with a {noun} to {num} percent.",
        ],
        "sym": ["E", "p", "m", "\\hbar", "\\omega", "k", "T", "B", "\\psi", "\\phi"],
    },
    "cs": {
        "neighbours": ["math", "economics"],
        "work": ["paper", "system", "benchmark", "framework"],
        "noun": "algorithm network model dataset compiler kernel cache thread server query "
                "protocol graph tree array parser scheduler database node packet buffer "
                "processor memory benchmark classifier encoder optimizer gradient layer token "
                "function program".split(),
        "verb": "compiles executes caches schedules trains parses queries indexes encrypts "
                "allocates partitions optimizes serializes routes".split(),
        "adj": "distributed parallel neural scalable concurrent recursive efficient sparse "
               "dynamic static secure asynchronous deterministic greedy approximate "
               "lightweight".split(),
        "templates": [
            "Our {adj} {noun} runs in $O(n \\log n)$ time and uses {num} MB of memory.",
            "We train the {noun} on {num} GPUs for {num} epochs with a batch size of {num}.",
            "The {noun} {verb} each {noun} in a {adj} {noun} with {num} {plural}.",
            "On the {noun} benchmark, the {adj} {noun} achieves {num} percent accuracy.",
            "Listing {num} shows how the {noun} {verb} the {noun} before the {noun} returns.",
            "The {adj} {noun} reduces latency by {num} ms compared with the {adj} {noun}.",
        ],
        "sym": ["n", "k", "O(n)", "G", "V", "E"],
    },
    "biology": {
        "neighbours": ["physics", "economics"],
        "work": ["study", "assay", "experiment", "survey"],
        "noun": "cell protein gene enzyme membrane tissue neuron receptor antibody mutation "
                "species population organism bacterium virus genome sequence pathway hormone "
                "mitochondrion ribosome chromosome embryo plant leaf root patient tumor "
                "infection".split(),
        "verb": "expresses binds regulates inhibits encodes activates transcribes metabolizes "
                "infects secretes replicates differentiates".split(),
        "adj": "cellular genetic metabolic viral bacterial chronic neural immune mutant "
               "transgenic embryonic endemic invasive photosynthetic pathogenic".split(),
        "templates": [
            "Expression of the {noun} increased {num} fold in {adj} {plural} after {num} hours.",
            "The {adj} {noun} {verb} the {noun} in {num} of {num} {plural}.",
            "We sequenced {num} {plural} and found that the {noun} {verb} the {noun}.",
            "Mice lacking the {noun} showed a {adj} {noun} at day {num}.",
            "The {noun} {verb} a {adj} {noun} that {verb} the {noun} in {plural}.",
        ],
        "sym": [],
    },
    "economics": {
        "neighbours": ["cs", "biology"],
        "work": ["paper", "model", "survey", "analysis"],
        "noun": "market price firm wage inflation tax policy consumer household bank credit "
                "demand supply equilibrium trade tariff labor capital investment revenue "
                "welfare auction contract incentive growth debt currency income".split(),
        "verb": "raises lowers stabilizes finances taxes subsidizes invests trades borrows "
                "lends regulates allocates".split(),
        "adj": "fiscal monetary competitive strategic optimal marginal aggregate regional "
               "informal rational volatile sustainable".split(),
        "templates": [
            "A {num} percent rise in the {noun} lowers the {noun} by {num} percent.",
            "In equilibrium, the {adj} {noun} {verb} the {noun} of each {noun}.",
            "We estimate the {noun} using data from {num} {plural} between {num} and {num}.",
            "The central bank {verb} the {noun} when {noun} exceeds {num} percent.",
            "Under a {adj} {noun}, every {noun} {verb} its {noun} to maximize {noun}.",
        ],
        "sym": [],
    },
    "art": {
        "neighbours": ["economics"],
        "work": ["essay", "exhibition", "review", "catalogue"],
        "noun": "painting sculpture portrait canvas gallery museum artist poet novel poem "
                "colour brush fresco mural landscape chapel opera symphony melody dancer "
                "theatre stage costume tapestry manuscript garden cathedral light shadow "
                "story".split(),
        "verb": "depicts evokes paints carves celebrates mourns illuminates adorns "
                "inspires recalls echoes honours".split(),
        "adj": "baroque romantic gothic luminous melancholic vivid pastoral ornate serene "
               "medieval abstract delicate golden solemn".split(),
        "templates": [
            "The {adj} {noun} {verb} a {noun} bathed in {adj} {noun}.",
            "Painted in {num}, the {noun} hangs in the {noun} beside a {adj} {noun}.",
            "Her {adj} {noun} {verb} the {noun} of the old {noun}.",
            "Critics praised the {noun} for its {adj} {noun} and {adj} {noun}.",
            "The {noun} was commissioned for the {noun} and completed in {num}.",
        ],
        "sym": [],
    },
}


class Rng:
    """Every random draw derives from random.Random(seed).random(), stable across Pythons."""

    def __init__(self, seed: int):
        self._r = random.Random(seed)

    def uniform(self) -> float:
        return self._r.random()

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def zipf(self, seq):
        """Choose with weight 1/(rank+1): realistic skewed word frequencies."""
        cum = _zipf_cum(len(seq))
        return seq[min(bisect.bisect_left(cum, self._r.random() * cum[-1]), len(seq) - 1)]


_ZIPF_CACHE: dict[int, list[float]] = {}


def _zipf_cum(n: int) -> list[float]:
    if n not in _ZIPF_CACHE:
        acc, out = 0.0, []
        for i in range(n):
            acc += 1.0 / (i + 1)
            out.append(acc)
        _ZIPF_CACHE[n] = out
    return _ZIPF_CACHE[n]


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def vbase(verb: str) -> str:
    """Third person singular -> base form (good enough for synthetic text)."""
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("sses", "ches", "shes", "xes", "zes")):
        return verb[:-2]
    return verb[:-1] if verb.endswith("s") else verb


def number(rng: Rng) -> str:
    r = rng.uniform()
    if r < 0.5:
        return str(1 + rng.below(9))
    if r < 0.8:
        return str(10 + rng.below(90))
    if r < 0.9:
        return str(1900 + rng.below(125))
    return f"{rng.below(10)}.{rng.below(100):02d}"


def fill(template: str, dom: dict, pool: dict, rng: Rng) -> str:
    """Replace each {slot} in order; a slot may borrow from a neighbour domain (`pool`)."""
    out, i = [], 0
    while True:
        j = template.find("{", i)
        if j < 0:
            out.append(template[i:])
            break
        k = template.find("}", j)
        slot = template[j + 1:k]
        if slot not in ("adj", "noun", "verb", "plural", "vbase", "num", "sym", "work"):
            # a literal brace in LaTeX text, e.g. "^{num}" is handled as "^" + "{num}"
            out.append(template[i:k + 1])
            i = k + 1
            continue
        out.append(template[i:j])
        src = dom
        if slot in ("adj", "noun", "verb", "plural", "vbase") and rng.uniform() < 0.12:
            src = DOMAINS[rng.choice(dom["neighbours"])]
        if slot == "num":
            word = number(rng)
        elif slot == "sym":
            word = rng.choice(dom["sym"]) if dom["sym"] else "x"
        elif slot == "work":
            word = rng.choice(dom["work"])
        elif slot == "plural":
            word = plural(rng.zipf(src["noun"]))
        elif slot == "vbase":
            word = vbase(rng.zipf(src["verb"]))
        else:
            word = rng.zipf(src[slot])
        out.append(word)
        i = k + 1
    text = re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", "".join(out))
    return text[0].upper() + text[1:]


def paragraph(dom: dict, rng: Rng) -> str:
    sentences = []
    for _ in range(3 + rng.below(6)):
        pool = dom["templates"] if rng.uniform() < 0.6 else GENERIC
        sentences.append(fill(rng.choice(pool), dom, DOMAINS, rng))
    return " ".join(sentences)


def split_text(dom: dict, rng: Rng, target_bytes: int) -> str:
    lines, size = [], 0
    while size < target_bytes:
        line = paragraph(dom, rng)
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
        if rng.uniform() < 0.3:  # M2D2 files contain blank rows; the loader drops them
            lines.append("")
            size += 1
    return "\n".join(lines) + "\n"


def make_corpus(out: Path) -> dict:
    corpus = out / "corpus"
    manifest = {"seed": SEED, "train_domain": TRAIN_DOMAIN, "domains": {}}
    for d_index, name in enumerate(sorted(DOMAINS)):
        dom = DOMAINS[name]
        files = {}
        for s_index, split in enumerate(("train", "valid", "test")):
            # an independent stream per (domain, split): adding a domain never changes the others
            rng = Rng(SEED * 1000 + d_index * 10 + s_index)
            target = EVAL_BYTES if split != "train" else (
                TRAIN_BYTES_MAIN if name == TRAIN_DOMAIN else TRAIN_BYTES_OTHER)
            data = split_text(dom, rng, target).encode("utf-8")
            path = corpus / name / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[split] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["domains"][name] = files
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = [str(out / "corpus" / name / "train.txt") for name in sorted(DOMAINS)]
    tok.train(files, trainer)
    tdir = out / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / "tokenizer.json"), pretty=True)
    # transformers' AutoTokenizer reads these two files; the class is the generic fast one.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
        "model_max_length": 1024, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
    }
    (tdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (tdir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tram_dist" / "data",
                   help="root folder: writes OUT/corpus/ and OUT/tokenizer/")
    args = p.parse_args(argv)
    manifest = make_corpus(args.out)
    make_tokenizer(args.out)
    total = sum(f["bytes"] for d in manifest["domains"].values() for f in d.values())
    print(f"wrote {len(manifest['domains'])} domains ({total / 1e6:.2f} MB) and tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
