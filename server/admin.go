package server

import (
	"github.com/ironroot/ironroot/server/adminapi"
	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
)

func registerAdmin(s *Server) error {
	svc, err := adminapi.New(adminapi.Config{
		TrustDomain: s.cfg.TrustDomain,
		Store:       s.store,
		CA:          s.ca,
		Logger:      s.log.With("component", "adminapi"),
	})
	if err != nil {
		return err
	}
	adminv1.RegisterAdminServer(s.adminSrv, svc)
	return nil
}
