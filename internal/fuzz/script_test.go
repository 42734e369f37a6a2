package fuzz_test

import "encoding/binary"

// script reads the choices of a stream target from fuzz bytes; past their end every choice is 0.
type script struct{ b []byte }

func (s *script) more() bool { return len(s.b) > 0 }

func (s *script) byte() int {
	if len(s.b) == 0 {
		return 0
	}
	c := s.b[0]
	s.b = s.b[1:]
	return int(c)
}

// int64 reads 8 bytes, big-endian (missing bytes count as 0): any value, huge and negative ones included.
func (s *script) int64() int64 {
	var b [8]byte
	n := copy(b[:], s.b)
	s.b = s.b[n:]
	return int64(binary.BigEndian.Uint64(b[:]))
}

// bytes reads a length (0 to 15) and that many bytes.
func (s *script) bytes() []byte {
	n := min(s.byte()%16, len(s.b))
	b := s.b[:n:n]
	s.b = s.b[n:]
	return b
}
