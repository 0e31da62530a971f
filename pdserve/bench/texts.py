"""The text of the text workloads: passages to quote, edit and ask about, and open-chat questions.

Real prompts, so that prompt lookup (n-gram matching against the prompt) has something to find. Passages
written for this harness; each names what an instruction can point at in it.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    title: str  # what the instruction calls it: "the following {title}"
    text: str
    quotes: tuple[str, ...]  # subjects that pick out one sentence each ("the sentence about ...")
    replacements: tuple[tuple[str, str], ...]  # (a word or phrase of the text, what to put instead)
    questions: tuple[str, ...]  # answered by the text itself


PASSAGES: tuple[Passage, ...] = (
    Passage(
        "history paragraph",
        "When the Erie Canal opened in October 1825, it joined the Hudson River at Albany to Lake Erie at Buffalo, "
        "a distance of 363 miles across upstate New York. Critics had called the project Clinton's Ditch, after "
        "Governor DeWitt Clinton, who pushed it through the legislature in 1817 against fierce opposition from "
        "New York City and the southern counties. The work was done largely by hand. Irish immigrants and local "
        "farmers cut through forests and swamps with shovels, axes and horse-drawn ploughs, and the engineers, "
        "most of whom had never seen a canal, learned their trade on the job. The channel was only forty feet "
        "wide and four feet deep, yet it needed 83 locks to climb the 568 feet between the river and the lake. "
        "The effect on trade was immediate. Before the canal, moving a ton of flour from Buffalo to New York "
        "City took about three weeks and cost nearly 100 dollars; afterwards it took eight days and cost about "
        "ten. Towns such as Syracuse, Rochester and Lockport grew rapidly along its banks, and New York City "
        "became the busiest port in the country. The canal was enlarged twice during the nineteenth century, "
        "but railroads gradually took most of its traffic.",
        quotes=("the cost of moving flour", "the number of locks", "who called the project a ditch"),
        replacements=(("canal", "waterway"), ("New York City", "Manhattan"), ("Buffalo", "Lake City")),
        questions=("How long was the canal?", "Who built the canal?", "Which towns grew along the canal?"),
    ),
    Passage(
        "product description",
        "The Trailhead 28 is a lightweight daypack built for long hikes and everyday commuting. Its main "
        "compartment holds 28 litres and opens with a wide U-shaped zip, so you can reach the bottom of the bag "
        "without unpacking everything above it. A padded sleeve at the back fits a laptop of up to 15 inches "
        "and doubles as a pocket for a hydration bladder. The shoulder straps are made of breathable mesh over "
        "closed-cell foam, and a removable hip belt moves part of the load onto your hips on steep climbs. "
        "On the front, a stretch pocket takes a wet rain jacket, and two side pockets hold one-litre bottles "
        "that you can reach while walking. The fabric is 210-denier recycled nylon with a water-repellent "
        "coating; the base is reinforced with a heavier 420-denier weave to resist abrasion on rocks. The pack "
        "weighs 780 grams and comes in three colours: slate grey, forest green and sunset orange. Every "
        "Trailhead 28 is covered by a lifetime warranty against defects in materials and workmanship, and "
        "repairs for ordinary wear are offered at cost.",
        quotes=("the laptop sleeve", "the weight of the pack", "the warranty"),
        replacements=(("Trailhead 28", "Summit 30"), ("pocket", "pouch"), ("28 litres", "30 litres")),
        questions=("What is the pack made of?", "What colours does it come in?", "How heavy is the pack?"),
    ),
    Passage(
        "Python module",
        "\"\"\"A token bucket: lets a stream of events through at an average rate while allowing short bursts.\"\"\"\n"
        "\n"
        "import time\n"
        "\n"
        "\n"
        "class TokenBucket:\n"
        "    \"\"\"Allows up to `rate` events per second on average, with bursts of up to `capacity` events.\"\"\"\n"
        "\n"
        "    def __init__(self, rate: float, capacity: int) -> None:\n"
        "        if rate <= 0 or capacity < 1:\n"
        "            raise ValueError(\"rate must be positive and capacity at least 1\")\n"
        "        self.rate = rate\n"
        "        self.capacity = capacity\n"
        "        self.tokens = float(capacity)\n"
        "        self.updated = time.monotonic()\n"
        "\n"
        "    def _refill(self) -> None:\n"
        "        now = time.monotonic()\n"
        "        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)\n"
        "        self.updated = now\n"
        "\n"
        "    def try_acquire(self, count: int = 1) -> bool:\n"
        "        \"\"\"Takes count tokens if they are there; returns whether it did.\"\"\"\n"
        "        self._refill()\n"
        "        if self.tokens >= count:\n"
        "            self.tokens -= count\n"
        "            return True\n"
        "        return False\n"
        "\n"
        "    def wait_time(self, count: int = 1) -> float:\n"
        "        \"\"\"Seconds until count tokens will be there.\"\"\"\n"
        "        self._refill()\n"
        "        missing = count - self.tokens\n"
        "        return max(0.0, missing / self.rate)\n"
        "\n"
        "    def __repr__(self) -> str:\n"
        "        return f\"TokenBucket(rate={self.rate}, capacity={self.capacity}, tokens={self.tokens:.2f})\"\n",
        quotes=("the method that refills the bucket", "the check of the constructor's arguments",
                "the docstring of the class"),
        replacements=(("tokens", "credits"), ("TokenBucket", "RateLimiter"), ("rate", "refill_rate")),
        questions=("What does try_acquire return?", "What happens when capacity is 0?",
                   "How is the waiting time computed?"),
    ),
    Passage(
        "recipe",
        "Red lentil soup (serves four). Rinse 250 grams of red lentils in a sieve until the water runs clear. "
        "Warm two tablespoons of olive oil in a large pot over medium heat, then add one chopped onion, two "
        "chopped carrots and a pinch of salt. Cook, stirring now and then, for about eight minutes, until the "
        "onion is soft and golden at the edges. Stir in three crushed cloves of garlic, one teaspoon of ground "
        "cumin and half a teaspoon of smoked paprika, and cook for one more minute, until fragrant. Add the "
        "lentils, one tin of chopped tomatoes and 1.2 litres of vegetable stock. Bring the pot to a boil, then "
        "lower the heat and simmer, partly covered, for 20 to 25 minutes, until the lentils have fallen apart. "
        "Blend about half of the soup with a stick blender, leaving the rest chunky, or blend all of it if you "
        "prefer a smooth soup. Squeeze in the juice of half a lemon, taste, and add salt and pepper as needed. "
        "Serve hot with a spoonful of yogurt, a few leaves of fresh coriander and warm flatbread. The soup "
        "keeps for three days in the fridge and thickens as it stands, so add a splash of water when you "
        "reheat it.",
        quotes=("the spices", "how long the soup simmers", "how to store the soup"),
        replacements=(("lentils", "split peas"), ("olive oil", "butter"), ("coriander", "parsley")),
        questions=("How many people does the recipe serve?", "What goes into the pot with the lentils?",
                   "What should you serve the soup with?"),
    ),
    Passage(
        "science explainer",
        "Tides are the regular rise and fall of the sea, and they are caused mainly by the gravity of the Moon. "
        "The Moon pulls hardest on the side of the Earth that faces it, a little less on the Earth's centre, "
        "and least on the far side. The difference between these pulls stretches the oceans into two bulges, "
        "one facing the Moon and one facing away from it. As the Earth turns, a coastline passes through both "
        "bulges every day, which is why most places see two high tides and two low tides roughly every 24 hours "
        "and 50 minutes. The extra 50 minutes come from the Moon's own motion along its orbit. The Sun raises "
        "tides as well, but they are less than half as strong, because the Sun is so much farther away. When "
        "the Sun, the Moon and the Earth line up, at new moon and full moon, the two effects add together and "
        "produce spring tides, with the highest highs and the lowest lows. At the quarter moons the Sun and the "
        "Moon pull at right angles, and the weaker neap tides follow. The shape of the coast and of the sea "
        "floor matters a great deal: the Bay of Fundy in Canada funnels the water so strongly that its tides "
        "can exceed 15 metres.",
        quotes=("spring tides", "the Bay of Fundy", "the extra 50 minutes"),
        replacements=(("Moon", "Luna"), ("tides", "tidal swings"), ("Earth", "planet")),
        questions=("What causes the tides?", "Why are there two high tides a day?",
                   "Why are the Sun's tides weaker than the Moon's?"),
    ),
    Passage(
        "office announcement",
        "Subject: Office move on Friday 14 March. Dear colleagues, as announced last month, the Leeds team is "
        "moving from the second floor of Park House to the new office at 12 Wellington Street. The move will "
        "take place on Friday 14 March, and the new office opens for work on Monday 17 March. Please pack the "
        "contents of your desk into the crates that facilities will deliver on Wednesday, label each crate with "
        "your name and new desk number, and leave them beside your desk by 4 pm on Thursday. Monitors, docking "
        "stations and keyboards will be moved by the removal company; do not pack them yourself. Laptops, "
        "chargers and anything valuable should go home with you. The new office has 64 desks on a booking "
        "system, four meeting rooms and a quiet room on the third floor. Bicycle storage is in the basement, "
        "and access cards will be handed out at reception on Monday morning from 8 am. If you need a fixed desk "
        "for medical or accessibility reasons, please tell Priya Shah in facilities by 7 March. Thank you for "
        "your patience during the move. Best regards, Tom Alvarez, Office Manager.",
        quotes=("access cards", "what the removal company will move", "fixed desks"),
        replacements=(("Friday 14 March", "Friday 21 March"), ("crates", "boxes"), ("Priya Shah", "Sam Lee")),
        questions=("When does the new office open?", "What should people take home?",
                   "Who should you contact about a fixed desk?"),
    ),
)

OPEN_CHAT_PROMPTS: tuple[str, ...] = (
    "What are three tips for staying focused while studying?",
    "Write a short poem about autumn rain.",
    "Explain how a bicycle stays upright when it moves.",
    "What should I pack for a weekend camping trip?",
    "Give me an idea for a birthday party for a seven-year-old.",
    "Why is the sky blue? Explain it simply.",
    "How can I get better at public speaking?",
    "Tell me a short story about a lost robot finding its way home.",
    "What are the benefits of learning a second language?",
    "Suggest a healthy breakfast that takes less than ten minutes.",
    "How do vaccines help the body fight disease?",
    "What is the difference between weather and climate?",
    "Write a friendly message inviting a neighbour to dinner.",
    "What are some good habits for saving money?",
    "Describe what a day in the life of a lighthouse keeper might be like.",
    "How do I start learning to play the guitar?",
    "What makes a good team leader?",
    "Explain what a black hole is to a ten-year-old.",
    "Give me three ideas for a rainy afternoon indoors.",
    "Why do cats purr?",
    "How does recycling plastic work?",
    "What questions should I ask at the end of a job interview?",
    "Write a limerick about a cat who loves cheese.",
    "How can I sleep better at night?",
)

# The system prompt every conversation of the multi-turn workload opens with (about 500 tokens): the shared
# prefix a prefix cache can hold once for all of them.
SYSTEM_PROMPT = (
    "You are Sage, a friendly and careful assistant who helps people with everyday questions: studying, "
    "cooking, travel, money, health habits, hobbies, writing and simple science. Follow these guidelines in "
    "every answer.\n\n"
    "Tone. Be warm, plain and direct. Write the way a knowledgeable friend would speak: no jargon unless the "
    "person uses it first, and then explain it in a few words. Do not flatter the person or praise the "
    "question. Do not apologise unless you made a mistake.\n\n"
    "Length. Keep answers short: two to five sentences for a simple question, a short list of at most five "
    "points when the person asks for tips, steps or ideas. If a longer answer would really help, give the "
    "short version first and offer to go into more detail.\n\n"
    "Accuracy. Say only what you are confident is true. When something depends on the person's situation, "
    "say what it depends on instead of guessing. When you do not know, say so and suggest where the person "
    "could find out. Never invent names, numbers, quotations or sources.\n\n"
    "Safety. For questions about health, medicine, law or money, give general information only and suggest "
    "talking to a doctor, lawyer or adviser for decisions that matter. If someone seems to be in danger, tell "
    "them to contact local emergency services at once. Do not give instructions that could hurt people, "
    "animals or property.\n\n"
    "Follow-up questions. The conversation may go on for several turns. Remember what the person told you "
    "earlier and build on your previous answers instead of repeating them. If the person asks you to change "
    "an earlier answer, shorten it, or explain it differently, do exactly that. If a request is unclear, ask "
    "one short question to clarify before answering.\n\n"
    "Formatting. Use plain sentences for most answers. Use a numbered list only for steps that must happen in "
    "order, and a bulleted list for options or tips. Do not use headings, tables or bold text. Write numbers "
    "as digits and give units in the metric system first, with imperial units in brackets where people might "
    "expect them.\n\n"
    "Examples. When an example would make an idea clearer, give one concrete example from daily life, such as "
    "a kitchen, a bus journey, a garden or a school day, rather than an abstract one.\n\n"
    "Privacy. Do not ask for personal details you do not need. If the person shares private information, use "
    "it only to answer their question and do not repeat it back unless it is necessary."
)

# Later turns of a multi-turn conversation: follow-ups that make sense after any first question.
FOLLOW_UPS: tuple[str, ...] = (
    "Can you give me a concrete example of that?",
    "Thanks. Could you make that shorter, in two sentences?",
    "What is the most common mistake people make with this?",
    "How would you explain that to a ten-year-old?",
    "Which of those points matters most, and why?",
    "Can you turn that into a simple checklist?",
    "What should I do first, today?",
    "Is there anything I should avoid?",
    "How long does it usually take to see results?",
    "What if I only have ten minutes a day for it?",
    "Can you say that again more simply?",
    "Where could I learn more about this?",
)
