"""The three tasks of Re-Tuning (Pasewark et al., ACL 2024) in its three formats, as data.

Every string is fixed by SPEC.md. A problem is a canonical string ("1234 + 5678", "[1, 0, 1]",
"[3, -2, 4]"); a *context* is a list of segments [prompt, completion, resume, completion, ...].
Baseline and scratchpad have one context per problem; Re-Tuning has one per recursive call:
    ["34 + 78\\nSolution: ", "Call: 4 + 8\\n", "Return: Carry 1, Output 2\\nAnswer: ", "Carry 1, Output 12"]
where the call is answered in its own context ["4 + 8\\nSolution: ", "Carry 1, Output 2"].
Tokens, not strings, are the contract (SPEC deviation 4): segments are encoded separately,
    [BOS] prompt | completion [EOS] | resume | completion [EOS]      loss mask 1 on completion + EOS
by `context_ids`, which training and the decoder both use. Each task also carries its facts:
its shortest problem, our default training length and the paper's training and evaluation
lengths. Training and evaluation data drawn from the tasks are in data.py.
"""
import json
import re


METHODS = ("baseline", "scratchpad", "retuning")


# ---- generic Re-Tuning rules (SPEC "Rules shared by every Re-Tuning context") ----
def child_prompt(sub_problem):
    return sub_problem + "\nSolution: "


def resume_text(value):
    return "Return: " + value + "\nAnswer: "


def read_completion(text):
    """("call", sub-problem), ("answer", value) or ("error", why) for one completion."""
    if "Call: " in text:
        sub = text[text.rindex("Call: ") + len("Call: "):]
        if not sub.endswith("\n"):
            return "error", "call without its newline"
        # the sub-problem runs up to the final newline; a newline inside it is no sub-problem
        return ("call", sub[:-1]) if "\n" not in sub[:-1] else ("error", "text after the call's newline")
    return "answer", (text[text.rindex("Answer: ") + len("Answer: "):] if "Answer: " in text else text)


# ---- token contract (SPEC deviation 4) ----
def prompt_ids(tok, prompt):
    return [tok.bos_id] + tok.encode(prompt)


def completion_ids(tok, completion):
    return tok.encode(completion) + [tok.eos_id]


def resume_ids(tok, value):
    return tok.encode(resume_text(value))  # the EOS before it ends the previous completion


def context_ids(tok, segments):
    """Token ids of one context and its loss mask: 1 on completions and their EOS, as the paper trains."""
    ids = prompt_ids(tok, segments[0])
    mask = [0] * len(ids)
    for i, seg in enumerate(segments[1:], start=1):
        if i % 2:  # odd positions are completions, trained on
            part, m = completion_ids(tok, seg), 1
        else:      # even positions are resumes: the returned value is never trained on
            value = seg[len("Return: "):-len("\nAnswer: ")]
            if resume_text(value) != seg:
                raise ValueError(f"segment {i} should be a resume 'Return: ...\\nAnswer: ', got {seg!r}")
            part, m = resume_ids(tok, value), 0
        ids, mask = ids + part, mask + [m] * len(part)
    return ids, mask


# ---- tasks ----
class Task:
    """Shared plumbing; subclasses define the formats and the facts below. Problems passed in must
    be canonical (`validate` makes them so); `question` is the problem as its prompts state it."""
    name, dedup = "", False  # dedup: keep each distinct Re-Tuning context once (addition, DP)
    # Lengths count digits or list items. min_len: the shortest problem. train_len: our default
    # longest training problem (evaluation goes to twice it). paper_train_len: the paper's
    # (SPEC "Data"). paper_eval_lengths: the paper's evaluation range (Fig. 3), as eval.py takes it.
    min_len, train_len, paper_train_len, paper_eval_lengths = 1, 0, 0, ""
    unit, chance = "digits", None  # what a length counts; the accuracy of guessing, where one exists
    max_len = 1000  # longer problems are refused: their traces grow with the square of the length

    def bounded(self, problem):
        if self.length(problem) > self.max_len:
            raise ValueError(f"{self.name} problems are limited to {self.max_len} {self.unit}, got {self.length(problem)}")
        return problem

    def prompt(self, problem, method):  # SPEC deviation 2: baseline prompts end in "\nAnswer: "
        question = self.question(problem)
        return question + "\nAnswer: " if method == "baseline" else child_prompt(question)

    def trace(self, problem, method):
        if method == "retuning":
            return self.retuning_trace(problem)
        completion = self.answer(problem) if method == "baseline" else self.scratchpad(problem)
        return [[self.prompt(problem, method), completion]]

    def examples(self, problem, method):
        """(everything before a completion, the completion) for every completion of the trace."""
        return [("".join(ctx[:i]), ctx[i]) for ctx in self.trace(problem, method) for i in range(1, len(ctx), 2)]

    def parse(self, method, text):
        if method == "retuning":  # the final completion is an answer, read by the generic rule
            kind, text = read_completion(text)
            if kind != "answer":
                return None
        m = re.fullmatch(self.patterns[method], text, flags=re.S)
        return self.finish(m) if m else None

    def finish(self, m):
        return m[1]


class ListTask(Task):
    """A task whose problem is a Python list of small integers, e.g. "[3, -2, 4]"."""
    values, example = range(0), ""

    def sample(self, rng, length):
        return str([rng.choice(self.values) for _ in range(length)])

    def validate(self, text):
        m = re.fullmatch(r"\s*\[\s*(-?[0-9]+(?:\s*,\s*-?[0-9]+)*)\s*\]\s*", text)
        items = [int(v) for v in m[1].split(",")] if m else []
        if not items or any(v not in self.values for v in items):
            raise ValueError(f"{self.name} problem must look like '{self.example}', got {text!r}")
        return self.bounded(str(items))

    def length(self, problem):
        return len(json.loads(problem))


class Addition(Task):
    name, dedup = "addition", True
    train_len, paper_train_len, paper_eval_lengths = 4, 15, "2-60"
    CARRY = r".*?(?:^|\n)Carry ([01]), Output ([0-9]+)"  # the last line of a scratchpad, or the answer
    patterns = {"baseline": r"([0-9]+)", "scratchpad": CARRY, "retuning": CARRY}

    def sample(self, rng, length):
        return f"{self.number(rng, length)} + {self.number(rng, length)}"

    @staticmethod
    def number(rng, digits):  # exactly `digits` digits; only "0" itself starts with 0
        return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))

    def validate(self, text):
        m = re.fullmatch(r"\s*([0-9]+)\s*\+\s*([0-9]+)\s*", text)
        if not m:
            raise ValueError(f"addition problem must look like '1234 + 5678', got {text!r}")
        return self.bounded(f"{m[1]} + {m[2]}")

    def padded(self, problem):  # SPEC: operands left-padded with zeros to equal length L, in every format
        a, b = problem.split(" + ")
        return a.zfill(len(b)), b.zfill(len(a))

    def length(self, problem):
        return len(self.padded(problem)[0])

    def question(self, problem):
        return " + ".join(self.padded(problem))

    def answer(self, problem):
        a, b = problem.split(" + ")
        return str(int(a) + int(b))

    def finish(self, m):  # "Carry c, Output s" -> "1" + s or s, without leading zeros
        # strip, not int(): Python refuses int() of over 4,300 digits, and a model may write that many
        return ((m[1] + m[2]).lstrip("0") or "0") if len(m.groups()) == 2 else m[1]

    @staticmethod
    def step(a, b):  # "Carry c_k, Output s_k" for two k-digit suffixes
        k, total = len(a), int(a) + int(b)
        return f"Carry {total // 10 ** k}, Output {total % 10 ** k:0{k}d}"

    def scratchpad(self, problem):
        a, b = self.padded(problem)
        return "\n".join(self.step(a[-k:], b[-k:]) for k in range(1, len(a) + 1))

    def retuning_trace(self, problem):
        """Contexts from the base case (k = 1) up, in SPEC's order; a call drops the leading digits."""
        a, b = self.padded(problem)
        contexts = [[child_prompt(f"{a[-1]} + {b[-1]}"), self.step(a[-1], b[-1])]]
        for k in range(2, len(a) + 1):
            contexts.append([child_prompt(f"{a[-k:]} + {b[-k:]}"), f"Call: {a[1 - k:]} + {b[1 - k:]}\n",
                             resume_text(self.step(a[1 - k:], b[1 - k:])), self.step(a[-k:], b[-k:])])
        return contexts


class Parity(ListTask):
    name, values, example = "parity", range(2), "[1, 0, 1]"
    train_len, paper_train_len, paper_eval_lengths = 6, 21, "2-29"
    unit, chance = "elements", 0.5  # a coin flip is right half the time
    patterns = {"baseline": r"([01])", "retuning": r"([01])",
                "scratchpad": r"Compute one element at a time\.(?: [01])* ([01])"}

    def question(self, problem):
        return f"What is the parity of {problem}?"

    def answer(self, problem):
        return str(sum(json.loads(problem)) % 2)

    def scratchpad(self, problem):  # the running parity of every prefix
        bits = json.loads(problem)
        return "Compute one element at a time." + "".join(f" {sum(bits[:i + 1]) % 2}" for i in range(len(bits)))

    def retuning_trace(self, problem):
        """Contexts from the top down; the call repeats the question without the first element."""
        bits = json.loads(problem)
        q = [self.question(str(bits[i:])) for i in range(len(bits))]
        return [[child_prompt(q[i]), f"Call: {q[i + 1]}\n", resume_text(self.answer(str(bits[i + 1:]))),
                 self.answer(str(bits[i:]))] for i in range(len(bits) - 1)] + [[child_prompt(q[-1]), str(bits[-1])]]


# Fixed DP sentences: Dziri et al.'s question (baseline) and reconstruction paragraph (scratchpad),
# and the release's rules for the chosen-indices and dp chains (Re-Tuning).
DP_QUESTION = ("Given a sequence of integers, find a subsequence with the highest sum, such that no two numbers in "
               "the subsequence are adjacent in the original sequence.\n\nOutput a list with \"1\" for chosen numbers "
               "and \"2\" for unchosen ones. If multiple solutions exist, select the lexicographically smallest. ")
DP_RECONSTRUCT = ("Finally, we reconstruct the lexicographically smallest subsequence that fulfills the task objective "
                  "by selecting numbers as follows. We store the result on a list named \"output\".")
DP_CHOOSE = "If there is only 1 item, return 1 if we should use it else 2."
DP_CALL = "If we should use the first item to get the sum, call False else True."
DP_APPEND = "Append max(return[0], array[0] + return[1]) to return."
DP_LIST = r"(\[[12](?:, [12])*\])"


def dp_solve(a):
    """SPEC's reference (Dziri et al. 2023): dp sums from the right, then the lexicographically
    smallest choice (1 = chosen, 2 = not) and `can_use` on entering each item."""
    n, dp = len(a), [0] * len(a)
    for i in reversed(range(n)):
        dp[i] = max(a[i], 0) if i == n - 1 else max(a[i + 1], a[i], 0) if i == n - 2 else \
            max(dp[i + 1], a[i] + dp[i + 2], 0)
    out, can_use = [], [True]
    for i in range(n):  # prefer choosing: choose whenever an optimal solution does
        chosen = can_use[i] and dp[i] == a[i] + (dp[i + 2] if i <= n - 3 else 0)
        out.append(1 if chosen else 2)
        can_use.append(not chosen)
    return dp, out, can_use[:n]


class DP(ListTask):
    name, values, example, dedup = "dp", range(-5, 6), "[3, -2, 4]", True
    min_len, train_len, paper_train_len, paper_eval_lengths = 2, 4, 5, "2-24"
    unit = "elements"
    patterns = {"baseline": DP_LIST, "retuning": DP_LIST,
                "scratchpad": r"Scratchpad: .*\n\nReconstructing all together, output=" + DP_LIST + r"\."}

    def answer(self, problem):
        return str(dp_solve(json.loads(problem))[1])

    def prompt(self, problem, method):
        return {"baseline": f"{DP_QUESTION}Input = {problem}.\nAnswer: ",
                "scratchpad": f"Question: Let's solve input = {problem}.",
                "retuning": child_prompt(f"Compute the maximum sum of nonadjacent subsequences of {problem}")}[method]

    def scratchpad(self, problem):
        """Dziri et al.'s scratchpad: one line per dp entry from the right, then one sentence per item."""
        a = json.loads(problem)
        dp, out, _ = dp_solve(a)
        lines = [self.dp_line(a, dp, i) for i in reversed(range(len(a)))]
        steps = [self.choice_sentence(a, dp, out, i) for i in range(len(a))]
        return ("Scratchpad: " + "\n".join(lines) + f"\n\n{DP_RECONSTRUCT}\n\nLet can_use_next_item = True.\n"
                + "\n".join(steps) + f"\n\nReconstructing all together, output={out}.")

    @staticmethod
    def dp_line(a, dp, i):
        if i == len(a) - 1:
            return f"dp[{i}] = max(input[{i}], 0) = max({a[i]}, 0) = {dp[i]}"
        if i == len(a) - 2:
            return f"dp[{i}] = max(input[{i}], input[{i + 1}], 0) = max({a[i]}, {a[i + 1]}, 0) = {dp[i]}"
        return (f"dp[{i}] = max(dp[{i + 1}], input[{i}] + dp[{i + 2}], 0) = "
                f"max({dp[i + 1]}, {a[i]} + {dp[i + 2]}, 0) = {dp[i]}")

    @staticmethod
    def choice_sentence(a, dp, out, i):
        """Quirks kept from the reference pairs: the "!=" sentence whenever the item is not chosen, even
        when both sides are equal ("(2 != 2)"), and no "We update" after the last item."""
        rhs, nums = (f"input[{i}] + dp[{i + 2}]", f"{a[i]} + {dp[i + 2]}") if i < len(a) - 2 else (f"input[{i}]", a[i])
        if out[i] == 1:
            s = f"Since dp[{i}] == {rhs} ({dp[i]} == {nums}) and can_use_next_item == True, we store output[{i}] = 1."
        else:
            s = f"Since dp[{i}] != {rhs} ({dp[i]} != {nums}) or can_use_next_item == False, we store output[{i}] = 2."
        return s + (f" We update can_use_next_item = {out[i] == 2}." if i < len(a) - 1 else "")

    def retuning_trace(self, problem):
        """The top context calls two chains (SPEC DP 1-3); listed top first, then each chain from the top down.
        Each chain's call drops the first element; its answer prepends one entry to the returned list."""
        a = json.loads(problem)
        dp, out, can_use = dp_solve(a)
        dp_q = [f"Create dp array {a[i:]}" for i in range(len(a))]
        ch_q = [f"Create chosen indices array: sum array {dp[i:]}, item array {a[i:]}, can use item {can_use[i]}"
                for i in range(len(a))]
        top = [self.prompt(problem, "retuning"), f"Call: {dp_q[0]}\n", resume_text(str(dp)),
               f"Call: {ch_q[0]}\n", resume_text(str(out)), str(out)]  # explicit answer: SPEC deviation 3
        dps, chs = [], []
        for i in range(len(a) - 1):
            dps.append([child_prompt(dp_q[i]), f"Call with array minus first element. Call: {dp_q[i + 1]}\n",
                        resume_text(str(dp[i + 1:])), f"{DP_APPEND}\nAnswer: {dp[i:]}"])
            chs.append([child_prompt(ch_q[i]), f"{DP_CHOOSE} {DP_CALL} Call: {ch_q[i + 1]}\n",
                        resume_text(str(out[i + 1:])), f"Append 1 if False else 2.\nAnswer: {out[i:]}"])
        dps.append([child_prompt(dp_q[-1]), f"Return [0] if negative else element.\nAnswer: {dp[-1:]}"])
        chs.append([child_prompt(ch_q[-1]), f"{DP_CHOOSE}\nAnswer: {out[-1:]}"])
        return [top] + dps + chs


TASKS = {"addition": Addition(), "parity": Parity(), "dp": DP()}
