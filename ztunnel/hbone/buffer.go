package hbone

import (
	"sync"
	"time"
)

// blockSize is the size of the buffers used for receive queues and copies.
// 256 KiB copy buffers measured 12-30% faster than smaller ones, and
// unpooled buffers halved the connection rate (PERF-FACTS).
const blockSize = 256 << 10

// The free lists keep at most 16 blocks (4 MiB) and 4 wire buffers
// (5.3 MiB) while traffic flows; a busy connection circulates a few of each.
var (
	blocks = newBufCache(blockSize, blockSize, 16)
	// wireBufs hold a connection's queued ciphertext (see wire).
	wireBufs = newBufCache(0, wireBufSize, 4)
)

func getBlock() *[]byte  { return blocks.get() }
func putBlock(b *[]byte) { blocks.put(b) }

// bufCache is a free list of buffers of one size.
//
// sync.Pool is not used because a buffer Put on one P sits in that P's
// private slot, out of reach of a Get on another, and the data path hands
// buffers across goroutines all the time (the frame reader fills a block,
// the stream's reader frees it): with sync.Pool it kept allocating 256 KiB
// and 1.3 MiB buffers now and then. Here any Get after a Put hits.
//
// To keep an idle tunnel small, buffers are dropped for the GC when the
// cache has gone a whole sweep period without a Get; at most max are kept.
type bufCache struct {
	len, cap, max int

	mu    sync.Mutex
	free  []*[]byte
	used  bool // a get since the last sweep
	timer *time.Timer
	armed bool
}

const sweepPeriod = 2 * time.Second

func newBufCache(length, capacity, max int) *bufCache {
	c := &bufCache{len: length, cap: capacity, max: max, free: make([]*[]byte, 0, max)}
	c.timer = time.AfterFunc(time.Hour, c.sweep)
	c.timer.Stop()
	return c
}

func (c *bufCache) get() *[]byte {
	c.mu.Lock()
	c.used = true
	if n := len(c.free); n > 0 {
		b := c.free[n-1]
		c.free[n-1] = nil
		c.free = c.free[:n-1]
		c.mu.Unlock()
		return b
	}
	c.mu.Unlock()
	b := make([]byte, c.len, c.cap)
	return &b
}

func (c *bufCache) put(b *[]byte) {
	*b = (*b)[:c.len]
	c.mu.Lock()
	if len(c.free) < c.max {
		c.free = append(c.free, b)
	}
	if !c.armed {
		c.armed = true
		c.timer.Reset(sweepPeriod)
	}
	c.mu.Unlock()
}

func (c *bufCache) sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.used {
		c.used = false
		c.timer.Reset(sweepPeriod)
		return
	}
	clear(c.free)
	c.free = c.free[:0]
	c.armed = false
}

// ringSize bounds the blocks of one receive queue. Flow control keeps the
// queued bytes within streamWindow, which spans streamWindow/blockSize
// blocks plus a partly read first one and a partly written last one.
const ringSize = streamWindow/blockSize + 2

// recvBuf is a stream's receive queue: a ring of pooled blocks written by
// the connection's frame reader and read by the stream's reader. It is
// guarded by the stream's mutex, except that the producer may fill the
// space returned by space() and the consumer may read the slice returned by
// readable() without it; the stream's producing and consuming flags say
// when that is going on so that blocks are not released under them.
type recvBuf struct {
	blocks [ringSize]*[]byte
	head   int // index of the first block
	n      int // blocks in use
	r      int // read offset in the first block
	w      int // write offset in the last block
	size   int // bytes queued
}

// space returns the free part of the last block, adding a block if it is
// full. It returns nil if the ring is full, which flow control prevents.
func (b *recvBuf) space(consuming bool) []byte {
	if b.n == 0 || b.w == blockSize {
		if b.n == ringSize {
			return nil
		}
		b.blocks[(b.head+b.n)%ringSize] = getBlock()
		b.n++
		b.w = 0
		if b.n == 1 {
			b.r = 0
		}
		// Drop a first block that has been read to its end, unless the
		// reader is still looking at it.
		if b.n > 1 && b.r == blockSize && !consuming {
			b.popHead()
		}
	}
	return (*b.blocks[(b.head+b.n-1)%ringSize])[b.w:]
}

func (b *recvBuf) commit(m int) {
	b.w += m
	b.size += m
}

// readable returns the queued bytes of the first block; size must be > 0.
func (b *recvBuf) readable() []byte {
	if b.n > 1 && b.r == blockSize {
		b.popHead()
	}
	blk := *b.blocks[b.head]
	if b.n == 1 {
		return blk[b.r:b.w]
	}
	return blk[b.r:]
}

// consume drops m bytes that the reader took from readable().
func (b *recvBuf) consume(m int, producing bool) {
	b.r += m
	b.size -= m
	switch {
	case b.n > 1 && b.r == blockSize:
		b.popHead()
	case b.n == 1 && b.r == b.w && !producing:
		// Empty: give the block back, so an idle stream holds no memory.
		b.popHead()
		b.w = 0
	}
}

func (b *recvBuf) popHead() {
	putBlock(b.blocks[b.head])
	b.blocks[b.head] = nil
	b.head = (b.head + 1) % ringSize
	b.n--
	b.r = 0
}

// release returns every block and reports how many bytes were dropped.
func (b *recvBuf) release() int {
	dropped := b.size
	for b.n > 0 {
		b.popHead()
	}
	b.head, b.w, b.size = 0, 0, 0
	return dropped
}
