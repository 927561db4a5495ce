"""Random values and subjects for the synthetic training facts: word lists, generated names, and
one maker per value kind (digits, codes, plain words, names, dates, UUIDs, amounts, times)."""
import random

SALAD_WORDS = """
able about above across act add afraid after afternoon age ago agree air all almost alone along
already also always among amount and angry animal answer any apple arm army around arrive art ask
aunt autumn away baby back bad bag ball bank basket bath bear beautiful bed bee before begin behind
bell below bench beside best better between bicycle big bird bitter black blanket blow board boat
body bone book border bottle bottom bowl box boy branch brave bread break breakfast bridge bright
bring broad brother brown brush build burn busy butter button buy cake call calm camera candle cap
car card care carpet carry cat chain chair chalk chance change cheap cheese chicken child chin
church circle clean clear clever climb clock close cloth cloud coat coffee cold collar colour comb
come common cook copper corner cotton country cousin cover cow crowd cup curtain cut dance dark
daughter day deep desk dinner dirty doctor dog door drawer dream dress drink drive dry dust ear
early earth east easy eat egg empty engine evening every eye face farm fast father feather fence
field finger fire fish flag floor flower fly fog follow food foot forest fork friend fruit full
garden gate gentle gift girl glass glove goat gold good grain grey hair hammer hand happy harbour
hat heavy hill hold hole home honey horse hospital hot hour house hungry ice idea ink iron island
jacket jam journey jug kettle kind king kitchen knee knife ladder lake lamp large late laugh lazy
leaf left letter library light line lion lip little loud low lunch map market meadow milk minute
mirror money monkey moon morning mother mountain mouth music nail narrow near neck needle nest net
new night north nose number old orange oven page paint paper parcel park pen pencil people pepper
picture pig pillow pin pipe plate pocket poor potato pretty quick quiet rabbit rain red ribbon rice
ring river road roof room rope round sail salt sand school sea seat seed shadow sheep shelf shell
ship shirt shoe shop short silver sister slow small smile snow soap soft song soup south spoon
spring square stair star station stone street string sugar summer supper table tail tall tea teacher
thread ticket tired toe tomato tooth towel tower town train tree uncle valley village wall warm
watch water west wheel white wide wind window winter wire wood wool yellow
""".split()
NAME_WORDS = """
amber azure birch cedar cobalt coral cypress ebony ember falcon fern flint garnet granite hazel
heron indigo ivory jade jasper juniper kestrel lark laurel linden maple marble myrtle nickel
obsidian ochre onyx opal osprey pearl pewter pine plover quartz raven rowan ruby russet saffron sage
slate sparrow spruce teal thistle topaz umber walnut willow wren zinc
""".split()
# Plain words for values that look like the text around them (none from the held-out suite's word
# lists).
TRAIN_ADJECTIVES = """
bold broken busy calm cheerful chilly clever crooked dainty dull early eastern empty fair false
famous fat final flat fresh friendly frozen funny golden grand great green hidden honest huge
jealous kind lame late lazy lean little lonely loose lost loyal mad magic mighty narrow naughty
noble northern obvious pale patient pink plump precious purple quick rare ready rich royal sacred
scarlet secret sharp shy sick simple slow soft sore spare stale steady strange strict strong sudden
sweet tall thick thin tough true ugly upper velvet warm wild wise wooden worn young
""".split()
FIRST_NAMES = """Ada Alma Amos Anya Arlo Basil Beata Bram Cora Cyrus Dalia Dario Edda Elio Enid Ezra
Faye Felix Greta Gus Hana Hugo Ines Ivo Jana Jonas Kira Knut Lena Levi Mara Milo Nadia Nils Olga
Omar Pia Quinn Rhea Rolf Sara Silas Tala Theo Una Uri Vera Viggo Wanda Wim Xena Yara Yusuf Zora
Zeno""".split()
LAST_NAMES = """Abbott Baird Castell Dunmore Ellery Farrow Garner Holloway Iverson Jessop Kettering
Lindqvist Marchetti Norcross Oakley Pemberton Quayle Rasmussen Sterling Thorne Underhill Vance
Whitlock Yardley Zeller Okafor Nakamura Petrov Haddad Moreau Brandt Szabo Kowalski Delgado
Fitzroy""".split()
ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "qu", "r",
          "s", "st", "t", "tr", "v", "w", "z", ""]
CODAS = ["", "", "", "", "", "n", "l", "r", "s", "m", "nd", "th"]
MONTHS = ("January February March April May June July August September October November "
          "December").split()
UNITS = ["kg", "litres", "metres", "grams", "miles", "volts", "hours", "euros", "pounds", "degrees"]
THINGS = ["lighthouse", "clock tower", "ferry", "telescope", "greenhouse", "boiler room", "archive",
          "glacier camp", "radio mast", "print shop", "orchard", "mill", "weather station",
          "bakery", "observatory", "museum wing"]
GROUPS = ["Society", "Guild", "Committee", "Company", "Institute", "Club", "Cooperative", "Bureau"]


# --- random values -------------------------------------------------------------------------------

def random_uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def random_code(rng: random.Random) -> str:
    """Two to four groups of capitals or digits, joined by one separator: "KX-4471", "58/QT/2",
    "RB0917"."""
    groups = [rng.choice([lambda: "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ",
                                                      k=rng.randint(1, 4))),
                          lambda: str(rng.randint(0, 10 ** rng.randint(1, 5) - 1))])()
              for _ in range(rng.randint(2, 4))]
    return rng.choice(["-", "/", ".", ":", "", "-", "/"]).join(groups)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def random_date(rng: random.Random) -> str:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1650, 2099)
    name = MONTHS[month - 1]
    return rng.choice([f"{day} {name} {year}", f"{name} {day}, {year}",
                       f"{year}-{month:02d}-{day:02d}", f"{ordinal(day)} {name} {year}",
                       f"{name} {ordinal(day)}, {year}", f"{name} {year}", f"{day}.{month}.{year}"])


def random_words(rng: random.Random) -> str:
    """One to three plain words, often as lower-case as the text around them."""
    adjective, noun, other = (rng.choice(TRAIN_ADJECTIVES), rng.choice(SALAD_WORDS),
                              rng.choice(SALAD_WORDS))
    return rng.choice([f"{rng.choice(NAME_WORDS)}-{noun}", f"{other} {noun}", f"{adjective} {noun}",
                       f"{adjective}-{noun}", f"{adjective} {other} {noun}",
                       f"the {adjective} {noun}", f"{other} and {noun}", noun,
                       f"{adjective} {rng.choice(NAME_WORDS)}"])


def made_up_name(rng: random.Random) -> str:
    """A pronounceable name of two or three syllables that no list holds: "Brenoli", "Tavesk"."""
    syllables = [rng.choice(ONSETS) + rng.choice("aeiouy") + rng.choice(CODAS)
                 for _ in range(rng.randint(2, 3))]
    return "".join(syllables).capitalize()


def person(rng: random.Random) -> str:
    """A listed first and last name half the time, made-up ones otherwise."""
    if rng.random() < 0.5:
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    return f"{made_up_name(rng)} {made_up_name(rng)}"


VALUE_KINDS = {
    "digits": lambda rng: str(rng.randint(10 ** (n := rng.randint(3, 11)) // 10 * 1, 10 ** n - 1)),
    "code": random_code,
    "words": random_words,
    "name": person,
    "date": random_date,
    "uuid": random_uuid,
    "amount": lambda rng: f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d} {rng.choice(UNITS)}",
    "time": lambda rng: f"{rng.randint(0, 23):02d}:{rng.choice(range(0, 60, 5)):02d}",
}


def random_value(rng: random.Random, kind: str) -> str:
    return VALUE_KINDS[kind](rng)


def subject(rng: random.Random) -> str:
    """Someone or something a fact is about: a person, a place, a group, a project, a thing."""
    return rng.choice([
        lambda: person(rng), lambda: f"the {rng.choice(THINGS)} at {rng.choice(LAST_NAMES)} Point",
        lambda: f"the {rng.choice(LAST_NAMES)} {rng.choice(GROUPS)}",
        lambda: f"project {rng.choice(NAME_WORDS).title()}",
        lambda: f"the {rng.choice(NAME_WORDS)} {rng.choice(THINGS)}",
        lambda: f"{rng.choice(FIRST_NAMES)}'s {rng.choice(THINGS)}",
    ])()
