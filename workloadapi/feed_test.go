package workloadapi

import (
	"sync"
	"testing"
)

func TestFeed(t *testing.T) {
	s1, s2, s3 := &Snapshot{}, &Snapshot{}, &Snapshot{}
	closes := 0
	f := NewFeed(s1, func() { closes++ })
	if got := <-f.Updates(); got != s1 {
		t.Fatal("initial snapshot not delivered first")
	}
	// Two pushes without a read: only the latest is delivered.
	f.Push(s2)
	f.Push(s3)
	f.Push(nil)
	if got := <-f.Updates(); got != s3 {
		t.Fatal("latest snapshot not delivered")
	}
	select {
	case <-f.Updates():
		t.Fatal("stale snapshot delivered")
	default:
	}
	f.Close()
	f.Close()
	f.Push(s1)
	select {
	case <-f.Updates():
		t.Fatal("snapshot delivered after Close")
	default:
	}
	if closes != 1 {
		t.Fatalf("onClose called %d times, want 1", closes)
	}

	empty := NewFeed(nil, nil)
	select {
	case <-empty.Updates():
		t.Fatal("feed without initial snapshot delivered one")
	default:
	}
	empty.Close()
}

func TestFeedConcurrentPush(t *testing.T) {
	f := NewFeed(nil, nil)
	last := &Snapshot{}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				f.Push(&Snapshot{})
			}
		}()
	}
	wg.Wait()
	f.Push(last)
	if got := <-f.Updates(); got != last {
		t.Fatal("after concurrent pushes the last push is not what is read")
	}
}
