"""Every language: WER per language and language-detection accuracy of the multilingual base
model on a small espeak-ng set, and base against tiny.en on English.

    nice -n 10 python -m bench.languages [--write docs/benchmarks.md]

The multilingual set is built at run time (never committed): two short passages per language,
read by espeak-ng's voice for it (``espeak-ng -v LANG``, 16 kHz WAV), each with its text as the
reference. Every file goes through vtp's local runner (``vtp transcribe``: VAD, batches of 8,
word alignment, coverage repair) with no ``--language``, so the language is the job's own
detection (``workers.languages``: a vote over its first chunks). WER: Whisper's basic normalizer
(case and punctuation; accents kept) + jiwer, for every language alike.

English: the repository's English media with references (``tests/data``) and the English
passages, through tiny.en (bundled) and base, both CTranslate2 int8 on CPU, beam 5: WER
(Whisper's English normalizer), lost runs (runs of >= 5 reference words with nothing in the
transcript, ``tests/wer.deletion_runs``) and speed (x realtime, one run after a warm-up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]

from app.config import Settings
from app.languages import LANGUAGES
from app.messages import TranscribeOptions
from bench.report import machine, write_section
from tests.support.wer import deletion_runs, wer, wer_any
from workers.engines.pool import EnginePool
from workers.local_runner import LocalRunner

DATA = ROOT / "tests" / "data"

#: language code -> (espeak-ng voice, two passages). Plain lecture-like sentences.
PASSAGES: dict[str, tuple[str, tuple[str, str]]] = {
    "en": ("en-us", (
        "Today we will talk about the history of the printing press. Before it, every book was copied by hand, "
        "and a single copy could take a year to finish.",
        "The experiment measures how fast a ball rolls down a slope. We repeat it ten times and write down "
        "the average, because a single measurement is never enough.",
    )),
    "es": ("es", (
        "Hoy vamos a hablar de la historia de la imprenta. Antes de ella, cada libro se copiaba a mano, "
        "y una sola copia podía tardar un año.",
        "El experimento mide la velocidad de una pelota que rueda por una rampa. Lo repetimos diez veces "
        "y anotamos el promedio.",
    )),
    "fr": ("fr", (
        "Aujourd'hui, nous allons parler de l'histoire de l'imprimerie. Avant elle, chaque livre était copié "
        "à la main, et une seule copie pouvait prendre un an.",
        "L'expérience mesure la vitesse d'une balle qui roule sur une pente. Nous la répétons dix fois "
        "et nous notons la moyenne.",
    )),
    "de": ("de", (
        "Heute sprechen wir über die Geschichte des Buchdrucks. Vorher wurde jedes Buch von Hand kopiert, "
        "und eine einzige Kopie konnte ein Jahr dauern.",
        "Das Experiment misst, wie schnell eine Kugel einen Hang hinunterrollt. Wir wiederholen es zehnmal "
        "und schreiben den Durchschnitt auf.",
    )),
    "it": ("it", (
        "Oggi parleremo della storia della stampa. Prima di essa, ogni libro veniva copiato a mano, "
        "e una sola copia poteva richiedere un anno.",
        "L'esperimento misura la velocità di una palla che rotola lungo un pendio. Lo ripetiamo dieci volte "
        "e scriviamo la media.",
    )),
    "pt": ("pt", (
        "Hoje vamos falar sobre a história da imprensa. Antes dela, cada livro era copiado à mão, "
        "e uma única cópia podia levar um ano.",
        "A experiência mede a velocidade de uma bola que rola por uma rampa. Repetimos dez vezes "
        "e anotamos a média.",
    )),
    "nl": ("nl", (
        "Vandaag praten we over de geschiedenis van de boekdrukkunst. Daarvoor werd elk boek met de hand "
        "overgeschreven, en één kopie kon een jaar duren.",
        "Het experiment meet hoe snel een bal van een helling rolt. We herhalen het tien keer "
        "en schrijven het gemiddelde op.",
    )),
    "pl": ("pl", (
        "Dzisiaj porozmawiamy o historii druku. Wcześniej każda książka była przepisywana ręcznie, "
        "a jedna kopia mogła zająć cały rok.",
        "Eksperyment mierzy, jak szybko piłka toczy się po zboczu. Powtarzamy go dziesięć razy "
        "i zapisujemy średnią.",
    )),
    "ru": ("ru", (
        "Сегодня мы поговорим об истории книгопечатания. До него каждую книгу переписывали от руки, "
        "и одна копия могла занять целый год.",
        "Эксперимент измеряет, как быстро мяч катится по склону. Мы повторяем его десять раз "
        "и записываем среднее значение.",
    )),
}


def speak(voice: str, text: str, dest: Path) -> Path:
    raw = dest.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True, timeout=120)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(dest)], check=True, timeout=120)
    raw.unlink()
    return dest


def run(runner: LocalRunner, path: Path, options: TranscribeOptions, out: Path) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = anyio.run(lambda: runner.run(path, options, out))
    return result.transcript, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    engines = EnginePool()
    base = TranscribeOptions(model="base")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runner = LocalRunner(Settings.from_env(data_dir=str(tmp)), engines=engines)
        files: list[tuple[str, Path, str]] = []
        for lang, (voice, texts) in PASSAGES.items():
            for i, text in enumerate(texts):
                files.append((lang, speak(voice, text, tmp / f"{lang}{i}.wav"), text))
        run(runner, files[0][1], base, tmp / "out")  # warm-up: the model loads
        per_lang: dict[str, list[tuple[float, str, float, float]]] = {}
        for lang, path, text in files:
            transcript, wall = run(runner, path, base, tmp / "out")
            per_lang.setdefault(lang, []).append((wer_any(text, transcript.text), transcript.language, transcript.duration, wall))
            print(lang, path.name, transcript.language, round(per_lang[lang][-1][0], 3), transcript.text, flush=True)

        english = [(p.name, p, (p.parent / (p.name.rsplit(".", 1)[0] + ".ref.txt")).read_text())
                   for p in (DATA / "jfk.flac", DATA / "talk_tts.mp4", DATA / "ivr_prompts.mp4")]
        english += [(f"espeak en{i}", path, text) for i, (lang, path, text) in enumerate(f for f in files if f[0] == "en")]
        rows = []
        for model in ("tiny.en", "base"):
            options = TranscribeOptions(model=model)
            run(runner, files[0][1], options, tmp / "out")  # warm-up
            for name, path, ref in english:
                transcript, wall = run(runner, path, options, tmp / "out")
                rows.append((name, model, transcript.duration, transcript.duration / wall, wer(ref, transcript.text),
                             len(deletion_runs(ref, transcript.text))))
                print(rows[-1], flush=True)

    lines = [
        f"Machine: {machine()} (shared with other jobs while measured). Engine: CTranslate2 int8 on CPU, beam 5, "
        "through the local runner (`vtp transcribe`), no `--language`: each file's language is the job's own "
        "detection. Speech: espeak-ng 1.51 voices (synthetic: clean, but not how people speak; a real-speech "
        "set would score worse), two passages per language, built at run time. "
        "Command: `nice -n 10 python -m bench.languages --write docs/benchmarks.md`.",
        "",
        "| language | files | audio s | WER (base) | language detected right |",
        "|---|---|---|---|---|",
    ]
    right_total = 0
    for lang, results in per_lang.items():
        audio = sum(r[2] for r in results)
        words = sum(len(t.split()) for t in PASSAGES[lang][1])
        w = sum(r[0] * len(t.split()) for r, t in zip(results, PASSAGES[lang][1])) / words
        right = sum(r[1] == lang for r in results)
        right_total += right
        wrong = ", ".join(sorted({r[1] for r in results if r[1] != lang}))
        lines.append(f"| {LANGUAGES[lang]} ({lang}) | {len(results)} | {audio:.0f} | {100 * w:.1f}% | "
                     f"{right}/{len(results)}{' (said ' + wrong + ')' if wrong else ''} |")
    n = sum(len(r) for r in per_lang.values())
    lines += ["", f"Language detection: {right_total}/{n} files right.", "",
              "English: tiny.en (bundled, English-only) against base (multilingual), same settings, one run after a warm-up.",
              "",
              "| file | audio s | model | x realtime | WER | lost runs (>= 5 words) |",
              "|---|---|---|---|---|---|"]
    for name, model, duration, speed, w, lost in rows:
        lines.append(f"| {name} | {duration:.0f} | {model} | {speed:.1f}x | {100 * w:.1f}% | {lost} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "languages", "Every language: the multilingual base model", table)


if __name__ == "__main__":
    main()
