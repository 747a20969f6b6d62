package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/loadgen"
)

// The plot is drawn with the standard library only: lines, points and a
// 5×7 pixel font, so that it can be regenerated anywhere Go runs.

var (
	white  = color.RGBA{255, 255, 255, 255}
	black  = color.RGBA{0, 0, 0, 255}
	grey   = color.RGBA{220, 220, 220, 255}
	blue   = color.RGBA{31, 119, 180, 255}
	red    = color.RGBA{214, 39, 40, 255}
	green  = color.RGBA{44, 160, 44, 255}
	grey2  = color.RGBA{127, 127, 127, 255}
	purple = color.RGBA{148, 103, 189, 255}
)

type series struct {
	name  string
	color color.RGBA
	xs    []float64
	ys    []float64
}

// writePlot draws fan-out latency and server RSS against N, both on
// logarithmic axes, side by side.
func writePlot(path string, rs []*loadgen.Result) error {
	img := image.NewRGBA(image.Rect(0, 0, 1200, 520))
	fill(img, img.Bounds(), white)
	var ns, p50, p99, all, rss, peak, wns, wp99, wpeak, kns, kp99, kpeak []float64
	for _, r := range rs {
		if len(r.Changes) == 0 {
			continue
		}
		if r.WholeMaps {
			wns = append(wns, float64(r.Agents))
			wp99 = append(wp99, secs(r.FanoutP99))
			wpeak = append(wpeak, float64(max(r.ServerRSSPeak, r.ServerRSSMax))/(1<<20))
			continue
		}
		if r.Kube {
			kns = append(kns, float64(r.Agents))
			kp99 = append(kp99, secs(r.FanoutP99))
			kpeak = append(kpeak, float64(max(r.ServerRSSPeak, r.ServerRSSMax))/(1<<20))
			continue
		}
		ns = append(ns, float64(r.Agents))
		p50 = append(p50, secs(r.FanoutP50))
		p99 = append(p99, secs(r.FanoutP99))
		all = append(all, secs(r.FanoutAllMax))
		rss = append(rss, float64(r.ServerRSSIdle)/(1<<20))
		peak = append(peak, float64(max(r.ServerRSSPeak, r.ServerRSSMax))/(1<<20))
	}
	fan := []series{{"P50", blue, ns, p50}, {"P99", red, ns, p99}, {"ALL N", green, ns, all}}
	mem := []series{{"IDLE", blue, ns, rss}, {"PEAK", red, ns, peak}}
	if len(wns) > 0 {
		fan = append(fan, series{"P99 WHOLE MAPS", grey2, wns, wp99})
		mem = append(mem, series{"PEAK WHOLE MAPS", grey2, wns, wpeak})
	}
	if len(kns) > 0 {
		fan = append(fan, series{"P99 KUBERNETES", purple, kns, kp99})
		mem = append(mem, series{"PEAK KUBERNETES", purple, kns, kpeak})
	}
	panel(img, image.Rect(0, 0, 600, 520), "NETMAP FAN-OUT (SECONDS) VS N AGENTS", fan)
	panel(img, image.Rect(600, 0, 1200, 520), "SERVER RSS (MIB) VS N AGENTS", mem)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func secs(d time.Duration) float64 { return d.Seconds() }

// panel draws one log-log chart of ss inside r.
func panel(img *image.RGBA, r image.Rectangle, title string, ss []series) {
	plot := image.Rect(r.Min.X+80, r.Min.Y+50, r.Max.X-40, r.Max.Y-60)
	text(img, r.Min.X+80, r.Min.Y+15, title, black, 2)
	xlo, xhi, ylo, yhi := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for i := range s.xs {
			if s.ys[i] <= 0 {
				continue
			}
			xlo, xhi = math.Min(xlo, s.xs[i]), math.Max(xhi, s.xs[i])
			ylo, yhi = math.Min(ylo, s.ys[i]), math.Max(yhi, s.ys[i])
		}
	}
	if math.IsInf(xlo, 0) {
		text(img, plot.Min.X, plot.Min.Y+20, "NO DATA", black, 2)
		return
	}
	// Whole decades around the data.
	xlo, xhi = math.Floor(math.Log10(xlo)), math.Ceil(math.Log10(xhi))
	ylo, yhi = math.Floor(math.Log10(ylo)), math.Ceil(math.Log10(yhi))
	if xhi == xlo {
		xhi++
	}
	if yhi == ylo {
		yhi++
	}
	px := func(x float64) int {
		return plot.Min.X + int((math.Log10(x)-xlo)/(xhi-xlo)*float64(plot.Dx()))
	}
	py := func(y float64) int {
		return plot.Max.Y - int((math.Log10(y)-ylo)/(yhi-ylo)*float64(plot.Dy()))
	}
	for e := xlo; e <= xhi; e++ {
		for m := 1.0; m < 10 && e+math.Log10(m) <= xhi; m++ {
			x := px(m * math.Pow(10, e))
			vline(img, x, plot.Min.Y, plot.Max.Y, grey)
			if m == 1 {
				vline(img, x, plot.Max.Y, plot.Max.Y+6, black)
				s := label(math.Pow(10, e))
				text(img, x-6*len(s), plot.Max.Y+12, s, black, 2)
			}
		}
	}
	for e := ylo; e <= yhi; e++ {
		for m := 1.0; m < 10 && e+math.Log10(m) <= yhi; m++ {
			y := py(m * math.Pow(10, e))
			hline(img, plot.Min.X, plot.Max.X, y, grey)
			if m == 1 {
				hline(img, plot.Min.X-6, plot.Min.X, y, black)
				s := label(math.Pow(10, e))
				text(img, plot.Min.X-10-12*len(s), y-7, s, black, 2)
			}
		}
	}
	hline(img, plot.Min.X, plot.Max.X, plot.Max.Y, black)
	vline(img, plot.Min.X, plot.Min.Y, plot.Max.Y, black)
	text(img, plot.Max.X-14*12, plot.Max.Y+36, "N AGENTS (LOG)", black, 2)
	for i, s := range ss {
		ly := plot.Min.Y + 10 + 22*i
		fill(img, image.Rect(plot.Min.X+12, ly+4, plot.Min.X+36, ly+8), s.color)
		text(img, plot.Min.X+44, ly, s.name, s.color, 2)
		prevX, prevY, have := 0, 0, false
		for j := range s.xs {
			if s.ys[j] <= 0 {
				continue
			}
			x, y := px(s.xs[j]), py(s.ys[j])
			fill(img, image.Rect(x-4, y-4, x+5, y+5), s.color)
			if have {
				line(img, prevX, prevY, x, y, s.color)
			}
			prevX, prevY, have = x, y, true
		}
	}
}

// label formats a power of ten: 0.01, 0.1, 1, 10, 100, 1000, 10000.
func label(v float64) string {
	if v >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	return strings.TrimRight(fmt.Sprintf("%.4f", v), "0")
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	r = r.Intersect(img.Bounds())
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			img.SetRGBA(x, y, c)
		}
	}
}

func hline(img *image.RGBA, x0, x1, y int, c color.RGBA) {
	fill(img, image.Rect(x0, y, x1+1, y+1), c)
}

func vline(img *image.RGBA, x, y0, y1 int, c color.RGBA) {
	fill(img, image.Rect(x, y0, x+1, y1+1), c)
}

// line draws a 3-pixel-wide line (Bresenham, thickened).
func line(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		fill(img, image.Rect(x0-1, y0-1, x0+2, y0+2), c)
		if x0 == x1 && y0 == y1 {
			return
		}
		if e2 := 2 * e; e2 >= dy {
			e += dy
			x0 += sx
		} else {
			e += dx
			y0 += sy
		}
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v < 0:
		return -1
	case v > 0:
		return 1
	}
	return 0
}

// text draws s with the 5×7 font at scale, top-left at (x, y).
func text(img *image.RGBA, x, y int, s string, c color.RGBA, scale int) {
	for _, r := range s {
		g, ok := font[r]
		if !ok {
			g = font['?']
		}
		for row, bits := range g {
			for col, b := range bits {
				if b == '#' {
					fill(img, image.Rect(x+col*scale, y+row*scale, x+(col+1)*scale, y+(row+1)*scale), c)
				}
			}
		}
		x += 6 * scale
	}
}

// font is a 5×7 pixel font of the characters the plot uses.
var font = map[rune][7]string{
	' ': {"     ", "     ", "     ", "     ", "     ", "     ", "     "},
	'0': {" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "},
	'1': {"  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "},
	'2': {" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"},
	'3': {"#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "},
	'4': {"   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "},
	'5': {"#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "},
	'6': {"  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "},
	'7': {"#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "},
	'8': {" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "},
	'9': {" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "},
	'.': {"     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "},
	'-': {"     ", "     ", "     ", "#####", "     ", "     ", "     "},
	'(': {"   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "},
	')': {" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "},
	'/': {"     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "},
	'?': {" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "},
	'A': {" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"},
	'B': {"#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "},
	'C': {" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "},
	'D': {"#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "},
	'E': {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"},
	'F': {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "},
	'G': {" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"},
	'H': {"#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"},
	'I': {" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "},
	'J': {"  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "},
	'K': {"#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"},
	'L': {"#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"},
	'M': {"#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"},
	'N': {"#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"},
	'O': {" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "},
	'P': {"#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "},
	'Q': {" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"},
	'R': {"#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"},
	'S': {" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "},
	'T': {"#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "},
	'U': {"#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "},
	'V': {"#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "},
	'W': {"#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "},
	'X': {"#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"},
	'Y': {"#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "},
	'Z': {"#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"},
}
