"""csrc/sass_count.py's reading of SASS control bits and its prefetch-reach check, on hand-made loops."""
import importlib.util
import pathlib

spec = importlib.util.spec_from_file_location(
    "sass_count", pathlib.Path(__file__).resolve().parents[1] / "csrc" / "sass_count.py")
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)


def ctl(wr=7, wait=()):
    return dict(stall=1, yld=0, wr=wr, rd=7, wait=sum(1 << s for s in wait))


def test_control_bits_of_real_encodings():
    # From cuobjdump of the library (sm_90): S2R sets scoreboard 0; the SHF that reads its result waits on it.
    s2r = sc.control(0x000E2E0000002100)
    assert (s2r["wr"], s2r["rd"], s2r["wait"], s2r["stall"]) == (0, 7, 0, 7)
    shf = sc.control(0x001FE2000001166E)
    assert (shf["wr"], shf["wait"]) == (7, 0b1)


def test_parse_keeps_control_bits():
    text = """
\t\tFunction : k
        /*0010*/                   S2R R110, SR_TID.X ;                                      /* 0x00000000006e7919 */
                                                                                             /* 0x000e2e0000002100 */
"""
    (arch, name, ins), = sc.parse(text)
    assert name == "k" and ins[0][:2] == (0x10, "S2R R110, SR_TID.X") and ins[0][2]["wr"] == 0


def test_prefetch_defeated_by_a_shared_scoreboard():
    # Step j's loads for j + 1 go out on SB5, then step j waits on SB5 for its own data: 0 HMMAs ahead.
    body = [("LDG.E.NA.128.CONSTANT R20, desc[UR16][R4.64]", ctl(wr=5)),
            ("PRMT R1, R24, 0x4440, RZ", ctl(wait=[5])),
            ("HMMA.16816.F32.BF16 R80, R80, R52, R84", ctl())] + [("HMMA.16816.F32.BF16 R80, R80, R52, R84", ctl())] * 7
    assert sc.w_load_reach(body) == 0


def test_prefetch_reaching_a_step_ahead():
    # Step j waits on SB5 first, then issues step j + 1's loads on it: they reach over the 8 HMMAs of step j.
    body = [("PRMT R1, R24, 0x4440, RZ", ctl(wait=[5])), ("LDG.E.NA.128.CONSTANT R24, desc[UR16][R4.64]", ctl(wr=5))] \
        + [("HMMA.16816.F32.BF16 R80, R80, R52, R84", ctl())] * 8
    assert sc.w_load_reach(body) == 8
    # The same loads issued at the end of the step are waited on at once.
    assert sc.w_load_reach(body[:1] + body[2:] + body[1:2]) == 0


def test_depbar_waits_for_a_count():
    # DEPBAR.LE SB5, 0x1 leaves the newest load in flight: only the older one is waited on.
    body = [("DEPBAR.LE SB5, 0x1", ctl()), ("HMMA.16816.F32.BF16 R80, R80, R52, R84", ctl()),
            ("LDG.E.NA.128.CONSTANT R24, desc[UR16][R4.64]", ctl(wr=5))]
    assert sc.w_load_reach(body) == 1  # each load is waited on an iteration later, after one more HMMA


def test_no_control_bits():
    assert sc.w_load_reach([("HMMA.16816.F32.BF16 R80, R80, R52, R84", None)]) is None
