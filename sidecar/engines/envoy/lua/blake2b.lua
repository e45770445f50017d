-- BLAKE2b with an 8-byte digest and no key (RFC 7693), for LuaJIT (Envoy's Lua).
--
-- Exactly policies/sharding.py's `score`: blake2b(shard .. "\0" .. key, digest_size=8),
-- read as a big-endian unsigned 64-bit number. LuaJIT has 32-bit bit operations only,
-- so every 64-bit word is a pair (hi, lo) of int32 values.

local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, tobit, bswap = bit.lshift, bit.rshift, bit.tobit, bit.bswap
local byte = string.byte

local IV_HI = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
local IV_LO = {0xf3bcc908, 0x84caa73b, 0xfe94f82b, 0x5f1d36f1, 0xade682d1, 0x2b3e6c1f, 0xfb41bd6b, 0x137e2179}
for i = 1, 8 do IV_HI[i] = tobit(IV_HI[i]); IV_LO[i] = tobit(IV_LO[i]) end

local SIGMA = {
  {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
  {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
  {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
  {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
  {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
  {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
  {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
  {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
  {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
  {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
}

local U32 = 4294967296

local vh, vl, mh, ml = {}, {}, {}, {}

-- v[a] += v[b] + m[x]  (64-bit, with carry)
local function add3(a, b, x)
  local lo = (vl[a] % U32) + (vl[b] % U32) + (ml[x] % U32)
  local carry = math.floor(lo / U32)
  vh[a] = tobit(vh[a] + vh[b] + mh[x] + carry)
  vl[a] = tobit(lo)
end

local function add2(a, b)
  local lo = (vl[a] % U32) + (vl[b] % U32)
  local carry = math.floor(lo / U32)
  vh[a] = tobit(vh[a] + vh[b] + carry)
  vl[a] = tobit(lo)
end

local function G(a, b, c, d, x, y)
  add3(a, b, x)
  local h, l = bxor(vh[d], vh[a]), bxor(vl[d], vl[a])   -- rotr 32
  vh[d], vl[d] = l, h
  add2(c, d)
  h, l = bxor(vh[b], vh[c]), bxor(vl[b], vl[c])          -- rotr 24
  vh[b] = bor(rshift(h, 24), lshift(l, 8))
  vl[b] = bor(rshift(l, 24), lshift(h, 8))
  add3(a, b, y)
  h, l = bxor(vh[d], vh[a]), bxor(vl[d], vl[a])          -- rotr 16
  vh[d] = bor(rshift(h, 16), lshift(l, 16))
  vl[d] = bor(rshift(l, 16), lshift(h, 16))
  add2(c, d)
  h, l = bxor(vh[b], vh[c]), bxor(vl[b], vl[c])          -- rotr 63 = rotl 1
  vh[b] = bor(lshift(h, 1), rshift(l, 31))
  vl[b] = bor(lshift(l, 1), rshift(h, 31))
end

local function word(s, pos)
  local b0, b1, b2, b3 = byte(s, pos, pos + 3)
  return tobit(bor(b0 or 0, lshift(b1 or 0, 8), lshift(b2 or 0, 16), lshift(b3 or 0, 24)))
end

local function compress(hh, hl, s, offset, count, last)
  for i = 0, 15 do
    local p = offset + i * 8
    ml[i] = word(s, p)
    mh[i] = word(s, p + 4)
  end
  for i = 0, 7 do
    vh[i], vl[i] = hh[i], hl[i]
    vh[i + 8], vl[i + 8] = IV_HI[i + 1], IV_LO[i + 1]
  end
  -- 128-bit byte counter: messages here are far below 2^32 bytes
  vl[12] = bxor(vl[12], tobit(count % U32))
  vh[12] = bxor(vh[12], tobit(math.floor(count / U32)))
  if last then
    vh[14], vl[14] = bnot(vh[14]), bnot(vl[14])
  end
  for r = 0, 11 do
    local sg = SIGMA[(r % 10) + 1]
    G(0, 4, 8, 12, sg[1], sg[2])
    G(1, 5, 9, 13, sg[3], sg[4])
    G(2, 6, 10, 14, sg[5], sg[6])
    G(3, 7, 11, 15, sg[7], sg[8])
    G(0, 5, 10, 15, sg[9], sg[10])
    G(1, 6, 11, 12, sg[11], sg[12])
    G(2, 7, 8, 13, sg[13], sg[14])
    G(3, 4, 9, 14, sg[15], sg[16])
  end
  for i = 0, 7 do
    hh[i] = bxor(hh[i], vh[i], vh[i + 8])
    hl[i] = bxor(hl[i], vl[i], vl[i + 8])
  end
end

local M = {}

-- The 64-bit score of `s` as two unsigned 32-bit halves (big-endian reading of the digest).
function M.score(s)
  local hh, hl = {}, {}
  for i = 0, 7 do hh[i], hl[i] = IV_HI[i + 1], IV_LO[i + 1] end
  -- parameter block: digest length 8, key length 0, fanout 1, depth 1
  hl[0] = bxor(hl[0], 0x01010008)
  local n = #s
  local offset = 1
  if n == 0 then
    compress(hh, hl, "", 1, 0, true)
  else
    while n - (offset - 1) > 128 do
      compress(hh, hl, s, offset, offset - 1 + 128, false)
      offset = offset + 128
    end
    compress(hh, hl, s, offset, n, true)
  end
  -- digest bytes = h[0] little-endian; big-endian number = byte-swapped halves
  local hi = bswap(hl[0]) % U32
  local lo = bswap(hh[0]) % U32
  return hi, lo
end

-- Rendezvous: the name with the highest score of name .. "\0" .. key; ties to the smaller name.
function M.pick(names, key)
  local best_name, best_hi, best_lo = nil, -1, -1
  for i = 1, #names do
    local name = names[i]
    local hi, lo = M.score(name .. "\0" .. key)
    if best_name == nil or hi > best_hi or (hi == best_hi and (lo > best_lo
        or (lo == best_lo and name < best_name))) then
      best_name, best_hi, best_lo = name, hi, lo
    end
  end
  return best_name
end

return M
