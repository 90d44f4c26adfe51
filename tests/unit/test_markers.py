import struct

from harness import markers
from harness.markers import Marker, Source


def test_pack_unpack_roundtrip():
    m = Marker(nonce=0x1122334455667788, source=Source.EDU, slot=3, seq=42, iova=0x2200_0000, t_ns=123456789)
    raw = markers.pack(m)
    assert len(raw) == markers.RECORD_SIZE
    assert raw[:8] == b"KDH-MRK1"
    assert markers.unpack(raw) == m


def test_layout_offsets_match_the_documentation():
    raw = markers.pack(Marker(nonce=1, source=2, slot=3, seq=4, iova=5, t_ns=6))
    assert struct.unpack_from("<Q", raw, 8)[0] == 1
    assert struct.unpack_from("<HH", raw, 16) == (markers.VERSION, 2)
    assert struct.unpack_from("<I", raw, 20)[0] == 3
    assert struct.unpack_from("<QQQ", raw, 24) == (4, 5, 6)
    assert raw[48:60] == bytes(12)


def test_any_flipped_bit_is_detected():
    raw = bytearray(markers.pack(Marker(nonce=7, source=1, slot=0, seq=1, iova=0, t_ns=0)))
    for bit in range(8 * 64):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert markers.unpack(bytes(bad)) is None, f"bit {bit} flip not detected"


def test_transfer_records_carry_their_own_iova():
    data = markers.transfer(9, Source.EDU, seq=5, iova=0x1000, t_ns=0, nbytes=256)
    recs = [markers.unpack(data[i:i + 64]) for i in range(0, 256, 64)]
    assert [r.iova for r in recs] == [0x1000, 0x1040, 0x1080, 0x10C0]
    assert [r.slot for r in recs] == [0, 1, 2, 3]


def test_canary_page_is_one_page_of_records():
    page = markers.canary_page(5, index=2, phys=0x3000)
    assert len(page) == 4096
    assert markers.unpack(page[64:128]).iova == 0x3040
    assert markers.unpack(page[:64]).source == Source.CANARY


def test_nonce_is_random_and_nonzero():
    a, b = markers.new_nonce(), markers.new_nonce()
    assert a and b and a != b
