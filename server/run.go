package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/ironroot/ironroot/server/config"
)

// RunFromFlags loads the configuration the flags name, starts the server and
// serves until ctx ends: `ironroot-server run`.
func RunFromFlags(ctx context.Context, flags config.Flags) error {
	cfg, err := config.Load(flags)
	if err != nil {
		return err
	}
	logger, err := NewLogger(cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return err
	}
	s, err := New(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.Run(ctx)
}

// NewLogger returns a slog logger writing to stderr at level in format
// ("text" or "json").
func NewLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "", "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("log format %q is not text or json", format)
}
