"""Answer normalisation of the official VQA and VizWiz evaluators and of EvalAI's answer processor, rule for rule.

Three public implementations matter for the published numbers:
- the official VQA evaluator (GT-Vision-Lab/VQA, vqaEval.py): `process_punctuation` and
  `process_digit_article`; it applies them only when the ten human answers disagree (see vqa.py);
- the official VizWiz evaluator (the VizWiz VQA API's vqaEval.py): the same two steps on the prediction, but its
  contraction table writes most apostrophes as U+2019 (see VIZWIZ_CONTRACTIONS);
- EvalAI's answer processor (MMF's `EvalAIAnswerProcessor`, copied into LLaVA's m4c_evaluator.py): the same
  two steps after lower-casing and dropping ',' and '?'. LLaVA runs it on every raw answer before VQAv2 and
  VizWiz submission, and the TextVQA evaluator runs it on predictions and human answers alike.

Reimplemented here (not imported: neither ships as a package) with the reference code's quirks kept, each
marked where it matters: tests pin every rule.
"""

from __future__ import annotations

import re

# The evaluator's contraction table (apostrophe-less spelling -> spelling with apostrophes), as one string of
# "key=value" items. Keys with capitals ("Im", "Ive") can never match: the words are lower-cased first.
_CONTRACTIONS_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(item.split("=", 1) for item in _CONTRACTIONS_TABLE.split())

# The VizWiz API's table: the VQA table retyped with typographic apostrophes (U+2019), except the entries below,
# which it keeps with the ASCII apostrophe. So "isnt" becomes "isn’t" there and never equals a human "isn't".
_VIZWIZ_ASCII_KEYS = {"couldn'tve", "hadn'tve"}
_VIZWIZ_ASCII_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
VIZWIZ_CONTRACTIONS: dict[str, str] = {
    (k if k in _VIZWIZ_ASCII_KEYS else k.replace("'", "\u2019")):
        (v if k in _VIZWIZ_ASCII_VALUES else v.replace("'", "\u2019"))
    for k, v in CONTRACTIONS.items()
}

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# Quirk kept: "(?!<=\d)" is a typo for a look-behind; it is a look-ahead for the literal text "<=" + digit, so
# in effect every '.' not followed by a digit is removed ("3.5" keeps its point, "5." and "a.b" lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Quirk kept: the reference passes re.UNICODE (= 32) as sub()'s positional *count*: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Each punctuation mark is deleted if it touches a space anywhere in the text (or the text has a
    digit,digit comma), otherwise replaced by a space; then periods not followed by a digit are deleted.
    The test is on the *input* text for every mark, as in the reference."""
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str, contractions: dict[str, str] = CONTRACTIONS) -> str:
    """Lower-case, number words -> digits ("none" -> "0"), drop a/an/the, restore contractions (VQA's table
    unless another is given)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(contractions.get(w, w) for w in words)


def clean_whitespace(text: str) -> str:
    """The evaluator's first step on every answer: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """Both of the official evaluator's steps, in its order."""
    return process_digit_article(process_punctuation(text))


def vizwiz_normalize(text: str) -> str:
    """The VizWiz evaluator's steps on a prediction: whitespace, punctuation, digits/articles, its own contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)), VIZWIZ_CONTRACTIONS)


def evalai_normalize(text: str) -> str:
    """EvalAI's answer processor: lower-case, drop ',' and '?', split "'s" off, then the evaluator's steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(clean_whitespace(text))
