"""The 64 emoji of a SAS short code, as Matrix numbers them (``data-definitions/sas-emoji.json``
of the Matrix specification), so that a code reads the same in Kluis and Matrix clients.

Each of the 7 emoji of a short code is one 6-bit index into this table; both users compare the
pictures or, where a terminal cannot draw them, the names.
"""

from __future__ import annotations

EMOJI: tuple[tuple[str, str], ...] = (
    ("\U0001f436", "Dog"),  # 0
    ("\U0001f431", "Cat"),  # 1
    ("\U0001f981", "Lion"),  # 2
    ("\U0001f40e", "Horse"),  # 3
    ("\U0001f984", "Unicorn"),  # 4
    ("\U0001f437", "Pig"),  # 5
    ("\U0001f418", "Elephant"),  # 6
    ("\U0001f430", "Rabbit"),  # 7
    ("\U0001f43c", "Panda"),  # 8
    ("\U0001f413", "Rooster"),  # 9
    ("\U0001f427", "Penguin"),  # 10
    ("\U0001f422", "Turtle"),  # 11
    ("\U0001f41f", "Fish"),  # 12
    ("\U0001f419", "Octopus"),  # 13
    ("\U0001f98b", "Butterfly"),  # 14
    ("\U0001f337", "Flower"),  # 15
    ("\U0001f333", "Tree"),  # 16
    ("\U0001f335", "Cactus"),  # 17
    ("\U0001f344", "Mushroom"),  # 18
    ("\U0001f30f", "Globe"),  # 19
    ("\U0001f319", "Moon"),  # 20
    ("\u2601\ufe0f", "Cloud"),  # 21
    ("\U0001f525", "Fire"),  # 22
    ("\U0001f34c", "Banana"),  # 23
    ("\U0001f34e", "Apple"),  # 24
    ("\U0001f353", "Strawberry"),  # 25
    ("\U0001f33d", "Corn"),  # 26
    ("\U0001f355", "Pizza"),  # 27
    ("\U0001f382", "Cake"),  # 28
    ("\u2764\ufe0f", "Heart"),  # 29
    ("\U0001f600", "Smiley"),  # 30
    ("\U0001f916", "Robot"),  # 31
    ("\U0001f3a9", "Hat"),  # 32
    ("\U0001f453", "Glasses"),  # 33
    ("\U0001f527", "Spanner"),  # 34
    ("\U0001f385", "Santa"),  # 35
    ("\U0001f44d", "Thumbs Up"),  # 36
    ("\u2602\ufe0f", "Umbrella"),  # 37
    ("\u231b", "Hourglass"),  # 38
    ("\u23f0", "Clock"),  # 39
    ("\U0001f381", "Gift"),  # 40
    ("\U0001f4a1", "Light Bulb"),  # 41
    ("\U0001f4d5", "Book"),  # 42
    ("\u270f\ufe0f", "Pencil"),  # 43
    ("\U0001f4ce", "Paperclip"),  # 44
    ("\u2702\ufe0f", "Scissors"),  # 45
    ("\U0001f512", "Lock"),  # 46
    ("\U0001f511", "Key"),  # 47
    ("\U0001f528", "Hammer"),  # 48
    ("\u260e\ufe0f", "Telephone"),  # 49
    ("\U0001f3c1", "Flag"),  # 50
    ("\U0001f682", "Train"),  # 51
    ("\U0001f6b2", "Bicycle"),  # 52
    ("\u2708\ufe0f", "Aeroplane"),  # 53
    ("\U0001f680", "Rocket"),  # 54
    ("\U0001f3c6", "Trophy"),  # 55
    ("\u26bd", "Ball"),  # 56
    ("\U0001f3b8", "Guitar"),  # 57
    ("\U0001f3ba", "Trumpet"),  # 58
    ("\U0001f514", "Bell"),  # 59
    ("\u2693", "Anchor"),  # 60
    ("\U0001f3a7", "Headphones"),  # 61
    ("\U0001f4c1", "Folder"),  # 62
    ("\U0001f4cc", "Pin"),  # 63
)
