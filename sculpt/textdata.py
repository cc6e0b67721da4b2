"""Rendered text: real inputs for the OCR models without a data set download.

Dark words on a light background drawn with PIL (DejaVu fonts when Debian's fonts-dejavu-core is
installed, else PIL's built-in font), preprocessed the way PP-OCR does: pixels / 255, then mean
0.5 and std 0.5, NCHW. The ground truth is the text itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["sculpt", "compresses", "ONNX", "models", "for", "ARM", "and", "mobile", "GPUs", "2026", "pruning",
         "int8", "latency", "accuracy", "phone", "board", "vision", "speech", "kernel", "tensor"]
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


def fonts() -> list[str]:
    """Paths of the DejaVu TrueType fonts found on this machine (may be empty)."""
    return sorted(str(p) for p in DEJAVU.glob("DejaVu*.ttf")) if DEJAVU.is_dir() else []


def _font(size: int, rng: np.random.Generator):
    from PIL import ImageFont

    found = fonts()
    if found:
        return ImageFont.truetype(found[int(rng.integers(0, len(found)))], size)
    return ImageFont.load_default(size=size)


def render_text_image(height: int, width: int, seed: int = 0, words_per_line: int = 3) -> tuple[np.ndarray, list[str]]:
    """An RGB uint8 image (height, width, 3) with lines of random words, and the lines' text."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    size = max(12, min(32, height // 2))
    font = _font(size, rng)
    lines = []
    y = max(2, (height - size) // 2) if height < 3 * size else 4
    while y + size <= height:
        text = " ".join(rng.choice(WORDS, words_per_line))
        draw.text((int(rng.integers(2, 10)), y), text, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
        lines.append(text)
        y += size * 3
    return np.asarray(img), lines


def ppocr_preprocess(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 normalised as PP-OCR expects."""
    arr = image.astype(np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def text_input(shape, seed: int = 0) -> np.ndarray:
    """A PP-OCR input of ``shape`` (1, 3, H, W) holding rendered text."""
    _, _, h, w = shape
    image, _ = render_text_image(h, w, seed)
    return ppocr_preprocess(image)


# ---------------------------------------------------------------------------------------------------
# A text-line data set: one short line of text per image, cropped like a text detector's box.
# ---------------------------------------------------------------------------------------------------

# Common English words (lowercase; the generator also writes them Capitalized and in UPPER case).
VOCABULARY = """
able about above accept across action active actor adapt add address adult advice after again
agent agree ahead air album alert alive allow almost alone along already also always amount angle
animal answer apple april area argue arm around arrive art article artist ask attack author autumn
avoid away baby back bad bag balance ball band bank base basic basket battle beach bear beauty
become bed before begin behind believe below best better between bicycle big bird birth black
blade blue board boat body bone book border bottle bottom box brain branch bread break bridge
bright bring brother brown budget build burn business busy butter button buy cable cake call
camera camp can capital captain car card care carry case castle cat catch cause ceiling center
chain chair chance change channel chapter charge cheap check cheese chicken child choice circle
city claim class clean clear climb clock close cloud coast coffee cold collect color column come
common company compare complete computer concert control cook cool copper corner cost cotton
count country course cover craft cream credit crowd culture cup current curve customer cycle
daily dance danger dark data date daughter day deal debate decide deep degree delay depth desert
design desk detail device diamond dinner direct doctor dog door double down draft dream dress
drink drive during early earth east easy edge effect eight either electric element empty energy
engine enjoy enough enter entry equal error escape evening event every exact example expert
extra eye face fact factory fair family famous farm fast father feature field figure file final
finger finish fire first fish five flat flight floor flower focus follow food foot forest forget
form forward four frame free fresh friend front fruit full future game garden gate general gentle
giant gift girl glass global gold good grain grand grass great green ground group grow guard
guest guide habit hair half hall hand happy harbor hard head health heart heavy height hello help
hidden high hill history hold holiday home honey horse hotel hour house human hundred idea image
impact income index inside island item jacket job join journey judge juice jump just keep key
kind king kitchen knife know label lake lamp land language large later laugh layer leader learn
leather left lemon length letter level library light limit line lion list little local long
machine magic main major market master match matter meal measure medal member memory metal
method middle milk minute mirror model moment money month moon morning mother motor mountain
mouse move music name narrow nation nature near network never night noble north note number
object ocean offer office often open orange order other output owner page paint paper parent park
party pass path pattern peace pencil people pepper period person phone piano picture piece pilot
place plan planet plant plate player pocket point police pool popular power press price print
prize problem process profit public purple quality quarter queen question quick quiet radio rain
range rapid reach ready reason record region remote report result return rich right river road
rock roof room round route rule safe salt sample sand save scale school science screen season
second secret select sense series seven shadow shape share sharp sheet shell shift ship shirt
short signal silver simple single sister size sleep slow small smart smile smooth snow soft solid
sound source south space speed spirit spring square stable stage standard star start station
steel step stone store storm story street strong student study style sugar summer sun supply
surface sweet system table talent target taste teacher team test text thank theory thick thin
three ticket tiger time title today token total tower town track trade train travel tree trip
truck true trust twelve type uncle under union unit upper urban usual valley value vector velvet
video view village visit voice volume wait walk wall warm watch water wave weather week weight
west wheel white whole wide window winter wire wise woman wonder wood word work world write
yellow young zebra zero zone
""".split()

# Faces used by default: the regular, bold and italic cuts of Sans, Serif and Mono (condensed too),
# not ExtraLight (hairline strokes) nor the MathTeXGyre font (a maths font).
LINE_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf",
              "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSerifCondensed.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
              "DejaVuSansMono-Oblique.ttf"]

# The PP-OCR rec input is 48×320: wider lines would be squeezed. Lines are kept at most this wide
# (width / height) so that they fit after the aspect-preserving resize to height 48.
MAX_LINE_ASPECT = 320 / 48


def line_fonts() -> list[str]:
    """Paths of the fonts text lines are drawn with: LINE_FONTS found on this machine, else any DejaVu
    font, else an empty list (PIL's built-in font is used)."""
    found = [str(DEJAVU / f) for f in LINE_FONTS if (DEJAVU / f).is_file()]
    return found or fonts()


_FONT_CACHE: dict = {}


def _truetype(path: str | None, size: int):
    from PIL import ImageFont

    key = (path, size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
    return _FONT_CACHE[key]


def random_token(rng: np.random.Generator, *, digits: float = 0.15, upper: float = 0.1,
                 capital: float = 0.25) -> str:
    """One token: a number (1–6 digits) with probability ``digits``, else a vocabulary word written in
    UPPER case (``upper``), Capitalized (``capital``) or lowercase."""
    u = rng.random()
    if u < digits:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
    word = str(VOCABULARY[int(rng.integers(0, len(VOCABULARY)))])
    v = rng.random()
    if v < upper:
        return word.upper()
    if v < upper + capital:
        return word.capitalize()
    return word


def render_line(text: str, font_path: str | None, size: int, rng: np.random.Generator, *,
                noise: float = 2.0) -> np.ndarray:
    """One line of ``text`` as a uint8 RGB image cropped like a detector's box: the text's horizontal
    extent and the font's cap-to-descender height, plus a small random margin. Dark text on a light
    background, colours and margins drawn from ``rng``; Gaussian pixel noise of up to ``noise``."""
    from PIL import Image, ImageDraw

    font = _truetype(font_path, size)
    probe = Image.new("L", (1, 1))
    draw = ImageDraw.Draw(probe)
    origin = (size, size)
    x0, y0, x1, y1 = draw.textbbox(origin, text, font=font)
    _, ry0, _, ry1 = draw.textbbox(origin, "Ag|", font=font)  # the line's vertical extent, whatever the text
    top, bottom = min(y0, ry0), max(y1, ry1)
    height = bottom - top
    mx0, mx1 = (int(round(height * m)) for m in rng.uniform(0.05, 0.3, 2))
    my0, my1 = (int(round(height * m)) for m in rng.uniform(0.05, 0.2, 2))
    box = (x0 - mx0, top - my0, x1 + mx1, bottom + my1)
    canvas_w, canvas_h = box[2] + size, box[3] + size

    base = rng.integers(185, 256)
    bg = np.clip(base + rng.integers(-15, 16, 3), 0, 255)
    ink = np.clip(rng.integers(0, 80) + rng.integers(-20, 21, 3), 0, 255)
    img = Image.new("RGB", (canvas_w, canvas_h), tuple(int(v) for v in bg))
    ImageDraw.Draw(img).text(origin, text, fill=tuple(int(v) for v in ink), font=font)
    arr = np.asarray(img.crop(box), dtype=np.float32)
    sigma = float(rng.uniform(0.0, noise)) if noise > 0 else 0.0
    if sigma > 0:
        arr = arr + rng.normal(0.0, sigma, arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def text_line(seed: int, index: int, *, max_words: int = 4, sizes: tuple[int, int] = (18, 40),
              max_aspect: float = MAX_LINE_ASPECT, noise: float = 2.0,
              font_paths: list[str] | None = None) -> tuple[np.ndarray, str]:
    """Line ``index`` of the data set ``seed``: (uint8 RGB image, text). Depends only on (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index), 0x5C])
    paths = font_paths if font_paths is not None else line_fonts()
    font_path = paths[int(rng.integers(0, len(paths)))] if paths else None
    size = int(rng.integers(sizes[0], sizes[1] + 1))
    words = [random_token(rng) for _ in range(int(rng.integers(1, max_words + 1)))]
    render_rng_state = rng.bit_generator.state
    while True:
        rng.bit_generator.state = render_rng_state  # same colours and margins whatever the word count
        text = " ".join(words)
        image = render_line(text, font_path, size, rng, noise=noise)
        if image.shape[1] <= max_aspect * image.shape[0] or len(words) == 1:
            return image, text
        words.pop()


def text_lines(count: int, seed: int = 0, **kwargs) -> list[tuple[np.ndarray, str]]:
    """``count`` text lines: (uint8 RGB image (H, W, 3) of one line, its text).

    Deterministic: line i depends only on (seed, i), so a shorter list is a prefix of a longer one.
    Each line has 1–4 tokens (English words in lower, Capitalized or UPPER case, and numbers), one of
    several DejaVu fonts (Sans, Serif, Mono; regular, bold, italic, condensed) at 18–40 px, slightly
    varied ink and paper colours, light pixel noise, and a tight crop with a small margin as a text
    detector would give. Lines wider than ``max_aspect`` × height lose words from the end, so that they
    fit the 48×320 PP-OCR rec input without squeezing. Keyword arguments go to :func:`text_line`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [text_line(seed, i, **kwargs) for i in range(count)]
