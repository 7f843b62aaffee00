// Security between roles (DESIGN §11): the credentials a stack generates for each role instance
// and the rules the broker and the services enforce with them.
export {};
