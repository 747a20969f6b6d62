package hostnet

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// resubscribeAfter is the wait before a lost subscription (the kernel
// dropped events: ENOBUFS) or directory watch is made again.
const resubscribeAfter = time.Second

// Watcher tells when the host's links, addresses or routes change, or a
// file in one of its directories: a value arrives on C after one or more
// changes (several changes may come as one value). It does not say what
// changed: the reader looks again. A lost subscription is made again, and
// counts as a change, since events may have been missed.
type Watcher struct {
	ns   netns.NsHandle // the namespace watched (the caller's at Watch)
	c    chan struct{}
	done chan struct{}
	wg   sync.WaitGroup
	log  *slog.Logger
	once sync.Once
}

// Watch starts watching links, addresses and routes of the calling
// thread's network namespace, and the files in dirs (each created with
// mode 0755 if missing). Close stops it.
func Watch(log *slog.Logger, dirs ...string) (*Watcher, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("watch the host: the current network namespace: %w", err)
	}
	w := &Watcher{ns: ns, c: make(chan struct{}, 1), done: make(chan struct{}), log: log}
	subs := []struct {
		what string
		sub  func(ns *netns.NsHandle, done <-chan struct{}, changed func(), failed func(error)) (<-chan struct{}, error)
	}{
		{"links", subscribeLinks},
		{"addresses", subscribeAddrs},
		{"routes", subscribeRoutes},
	}
	for _, s := range subs {
		// The first subscription is made here, so that an error (no
		// netlink) fails the start; later ones by the goroutine.
		// Later subscriptions run on other threads: they name the
		// namespace.
		sub := func(done <-chan struct{}, changed func(), failed func(error)) (<-chan struct{}, error) {
			return s.sub(&w.ns, done, changed, failed)
		}
		ended, err := sub(w.done, w.changed, w.failed(s.what))
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("watch %s: %w", s.what, err)
		}
		w.wg.Go(func() { w.keep(s.what, ended, sub) })
	}
	for _, dir := range dirs {
		ended, err := watchDir(dir, w.done, w.changed)
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("watch %s: %w", dir, err)
		}
		w.wg.Go(func() {
			w.keep(dir, ended, func(done <-chan struct{}, changed func(), _ func(error)) (<-chan struct{}, error) {
				return watchDir(dir, done, changed)
			})
		})
	}
	return w, nil
}

// C delivers a value after changes.
func (w *Watcher) C() <-chan struct{} { return w.c }

// Close stops the watcher and waits for its goroutines. It is idempotent.
func (w *Watcher) Close() error {
	w.once.Do(func() {
		close(w.done)
		w.wg.Wait()
		w.ns.Close()
	})
	return nil
}

func (w *Watcher) changed() {
	select {
	case w.c <- struct{}{}:
	default:
	}
}

func (w *Watcher) failed(what string) func(error) {
	return func(err error) {
		select {
		case <-w.done:
		default:
			w.log.Debug("host watch interrupted; watching again", "what", what, "err", err)
		}
	}
}

// keep waits for a subscription to end and makes it again until the
// watcher closes.
func (w *Watcher) keep(what string, ended <-chan struct{}, sub func(<-chan struct{}, func(), func(error)) (<-chan struct{}, error)) {
	for {
		select {
		case <-ended:
		case <-w.done:
			<-ended
			return
		}
		w.changed() // events may have been lost
		t := time.NewTimer(resubscribeAfter)
		select {
		case <-w.done:
			t.Stop()
			return
		case <-t.C:
		}
		var err error
		if ended, err = sub(w.done, w.changed, w.failed(what)); err != nil {
			w.log.Warn("cannot watch the host for changes; repairs wait for the periodic resync", "what", what, "err", err)
			closed := make(chan struct{})
			close(closed)
			ended = closed
		}
	}
}

// forward calls changed for every value of ch until ch is closed, then
// closes ended. The netlink library closes ch when its socket closes (done,
// or an error).
func forward[T any](ch <-chan T, changed func()) <-chan struct{} {
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		for range ch {
			changed()
		}
	}()
	return ended
}

func subscribeLinks(ns *netns.NsHandle, done <-chan struct{}, changed func(), failed func(error)) (<-chan struct{}, error) {
	ch := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: ns, ErrorCallback: failed}); err != nil {
		return nil, err
	}
	return forward(ch, changed), nil
}

func subscribeAddrs(ns *netns.NsHandle, done <-chan struct{}, changed func(), failed func(error)) (<-chan struct{}, error) {
	ch := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: ns, ErrorCallback: failed}); err != nil {
		return nil, err
	}
	return forward(ch, changed), nil
}

func subscribeRoutes(ns *netns.NsHandle, done <-chan struct{}, changed func(), failed func(error)) (<-chan struct{}, error) {
	ch := make(chan netlink.RouteUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: failed}); err != nil {
		return nil, err
	}
	return forward(ch, changed), nil
}

// dirEvents are the inotify events that mean a file in the directory was
// created, written, replaced, removed, or the directory itself went.
const dirEvents = unix.IN_CREATE | unix.IN_DELETE | unix.IN_CLOSE_WRITE | unix.IN_MODIFY | unix.IN_MOVED_FROM |
	unix.IN_MOVED_TO | unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

// watchDir watches dir with inotify until done, or until dir is removed
// or moved (ended closes; the caller watches again).
func watchDir(dir string, done <-chan struct{}, changed func()) (<-chan struct{}, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, dirEvents); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("inotify %s: %w", dir, err)
	}
	// A non-blocking descriptor in an *os.File uses the runtime's poller:
	// Close unblocks a Read.
	f := os.NewFile(uintptr(fd), "inotify:"+dir)
	ended := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		select {
		case <-done:
		case <-stop:
		}
		f.Close()
	}()
	go func() {
		defer close(ended)
		defer close(stop)
		buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			n, err := f.Read(buf)
			if err != nil {
				if !errors.Is(err, os.ErrClosed) {
					changed()
				}
				return
			}
			gone := false
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				// The kernel's native layout.
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				if ev.Mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 {
					gone = true
				}
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
			changed()
			if gone {
				return
			}
		}
	}()
	return ended, nil
}
